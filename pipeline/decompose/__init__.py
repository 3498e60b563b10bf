"""Pure decompositions: a weight tensor in, factors out. No modules, no I/O, no Ray, no MLflow."""
