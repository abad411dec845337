"""Spectral partition of a weight graph: the n-cut, the Laplacian eigensolvers and k-means."""
