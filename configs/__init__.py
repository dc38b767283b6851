"""The Hydra config tree of hai-train, shipped with the code as package data: config.yaml and one folder per
group (model/ parallel/ fp8/ data/ optim/ trainer/ logging/ experiment/), plus cluster/ for hai-plan. The YAML files
hold values only; every field is documented once, in its dataclass (trainer/config.py lists them)."""

from importlib.resources import files

ROOT = files(__name__)  # a Traversable: the tree inside the installed package or the source checkout
