"""medct.finetune: installed inside the medct namespace (see DESIGN.md)."""
