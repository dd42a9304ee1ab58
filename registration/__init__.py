"""medct.registration: installed inside the medct namespace (see DESIGN.md)."""
