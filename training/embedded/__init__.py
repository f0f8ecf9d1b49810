"""How this repository's own tiny CLIPs and embedded checkpoints were made (README.md): the generated world, real
photo sets, captions, the trainers, the recipes and their report scripts. Not the product's build
(``training.pipeline``), which never imports this package."""
