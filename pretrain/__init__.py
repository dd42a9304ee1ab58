"""medct.pretrain: installed inside the medct namespace (see DESIGN.md)."""
