"""Starting and planning jobs: hai-launch (torchrun from the config), the SLURM script, hai-plan (the cost model)."""
