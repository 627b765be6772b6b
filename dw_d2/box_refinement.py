def refine_box_distances(*args, **kwargs):
    raise NotImplementedError
