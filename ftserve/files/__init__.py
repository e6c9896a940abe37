"""What ftserve reads and writes on disk: adapter folders in PEFT's layout and their plain-LoRA export
(``adapter_folder``), safetensors checkpoints read by offset (``checkpoint``), outputs that appear whole
(``atomic``), local folders or Hub ids (``hub``), and folders confined to a root (``confinement``)."""
