"""Promoting clusterability (Filan et al. 2021, section 5): the spectral regulariser, the ReLU
weight normaliser and the clusterable initialisation."""
