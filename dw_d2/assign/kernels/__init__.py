"""Speed kernels of the weighting: what the schemes' formulas call, never the formulas.

Each function here computes a plainly named quantity with torch's values and gradients, but
faster or leaner than the stock op-by-op graph on the CPU (hand-written backward passes,
fused sweeps over cache-sized blocks, no slow paths). Each has a plain-PyTorch counterpart
that gives the same numbers, used by the tests as a check and available to prototype with:

========================================  ==============================================
kernel                                    plain counterpart
========================================  ==============================================
``negative_term.focal_negative_sum``      ``negative_term.plain_negative_sum`` (any term)
``box_overlap.aligned_iou_and_giou``      its op-by-op path (taken when gradients are
                                          needed for both boxes)
``elementwise.exp``                       ``torch.exp``
``elementwise.bce_with_one_target``       ``F.binary_cross_entropy(p, 1)``
``elementwise.focal_negative_term``       ``x**gamma * F.binary_cross_entropy(x, 0)``
``gather.gather_coordinates``             ``table[index].t()``
``gather.expand_per_gt``                  ``per_gt[:, gt_of_pair]``
========================================  ==============================================
"""
