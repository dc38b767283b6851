"""Pipeline parallelism (paper 3.2.1): schedules as data, their validator and simulator, stages, the executor."""
