"""Datasets and data modules: the on-disk episode store and demo-window sampling."""
