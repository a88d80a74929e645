"""Starting training processes, standard library only (no torch import): `launcher` is the finetune/*.sh launchers'
logic (recipes, options, environment checks, the command) and `torchrun` is the torchrun the ranks start through."""
