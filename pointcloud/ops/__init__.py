"""Pure-PyTorch point-cloud ops (one op per file): FPS, KNN, Chamfer, three-NN interpolation."""
