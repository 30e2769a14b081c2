"""Weight porting between PyTorch and Flax, and the numerical checks that the two agree."""
