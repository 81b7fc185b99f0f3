"""Package data: the shipped recipe files (``*.toml``), installed as ``lowprec.recipe_files``."""
