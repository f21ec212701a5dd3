"""Low-level kernels shared by the model and the execution layer (:mod:`so3krates.runtime`).

- :mod:`~so3krates.ops.scatter`: sums of rows into buckets (edges into atoms, atoms into structures);
- :mod:`~so3krates.ops.slots`: the same sums without scatter-adds, through a padded table of every atom's
  edges ("slots"), so that compiled programs can run their kernels on all threads;
- :mod:`~so3krates.ops.spline`: a cubic Hermite spline of a vector-valued function of one variable, which
  the execution layer uses to read the radial filters from a table instead of evaluating their network.
- :mod:`~so3krates.ops.pair_messages`: a fused layer's per-edge messages and their sum over each atom's
  edges in one hand-written C++ kernel (forward and backward), for edges in pair order.

No equations of the model live here, and nothing here knows about the model.
"""
