"""Models bigger than the driver's memory: weights stay in their safetensors files and are read one block at a
time (`store`, `units`), and a job's compressed layers are written to shards as they finish (`writer`, `job`)."""
