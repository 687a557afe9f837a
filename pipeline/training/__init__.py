"""Training's command-line side: the synthetic world's clips and evaluation (`synth`, `eval`), fine-tuning on a
manifest (`train`), and the recipe that rebuilds the shipped world model (`demo-model`)."""
