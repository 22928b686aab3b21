"""Loading: diffusers folders and hub ids resolved, safetensors converted to Flax parameter trees,
model configs read and checked, the `Pipeline` bundle, export back to diffusers. Imports `models`
and the leaf utilities only."""
