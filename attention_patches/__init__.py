"""Pure-torch attention behaviours and layer maps. Nothing here imports ComfyUI."""
