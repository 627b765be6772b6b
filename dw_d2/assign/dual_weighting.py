def dual_weighting_loss(*args, **kwargs):
    raise NotImplementedError
