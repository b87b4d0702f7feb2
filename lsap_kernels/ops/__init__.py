"""The op families: one folder each, holding the reference, the kernels' launchers and the autograd Functions."""
