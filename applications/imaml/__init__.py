"""Few-shot implicit MAML (iMAML)."""
