"""Everything that knows about ranks (DESIGN.md): the process grid, expert and pipeline parallelism, ZeRO."""
