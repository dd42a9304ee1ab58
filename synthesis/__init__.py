"""medct.synthesis: installed inside the medct namespace (see DESIGN.md)."""
