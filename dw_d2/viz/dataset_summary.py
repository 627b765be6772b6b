"""The picture of :func:`dw_d2.data.summary.summarize_dataset`: one PNG of histograms."""
import numpy as np

from .figures import new_figure, save_figure

__all__ = ["plot_dataset_summary"]

_SCALE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def plot_dataset_summary(summary, output_path):
    """Six panels: boxes per class, boxes per image, box sizes in image and input pixels
    (with the strides), shorter box side at the input sizes, FCOS levels, and boxes that
    contain no point of each level.

    Args:
        summary (DatasetSummary): from :func:`~dw_d2.data.summary.summarize_dataset`.
        output_path (str or Path): the PNG to write.

    Returns:
        Path: ``output_path``.
    """
    s = summary
    fig, axes = new_figure(2, 3, panel_size=(4.6, 3.4))
    ax = axes[0, 0]
    positions = np.arange(len(s.class_names))
    ax.bar(positions, s.boxes_per_class, color="tab:gray")
    ax.set_xticks(positions, s.class_names, rotation=45 if len(s.class_names) > 6 else 0,
                  ha="right" if len(s.class_names) > 6 else "center", fontsize=8)
    ax.set_title(f"boxes per class ({s.num_boxes}; {s.num_crowd} crowd)")

    ax = axes[0, 1]
    if len(s.boxes_per_image):
        most = int(s.boxes_per_image.max())
        ax.hist(s.boxes_per_image, bins=np.arange(most + 2) - 0.5, color="tab:gray")
        p90, p99 = np.percentile(s.boxes_per_image, [90, 99])
        ax.set_title(f"boxes per image (p90 {p90:.0f}, p99 {p99:.0f}, max {most})")
    ax.set_xlabel("boxes")
    ax.set_ylabel("images")

    if s.num_boxes:
        _histograms(axes[0, 2], s, [np.sqrt(s.box_width * s.box_height)] + [
            np.sqrt(sc.box_width * sc.box_height) for sc in s.scales], with_image_pixels=True)
        _histograms(axes[1, 0], s, [np.minimum(sc.box_width, sc.box_height)
                                    for sc in s.scales])
    axes[0, 2].set_title("box size sqrt(w*h)")
    axes[0, 2].set_xlabel("pixels")
    axes[1, 0].set_title("shorter box side at the input size")
    axes[1, 0].set_xlabel("input pixels")

    width = 0.8 / max(len(s.scales), 1)
    levels = np.arange(len(s.strides))
    for panel, title, values in (
        (axes[1, 1], "FCOS level (8s < longer side <= 16s)",
         [np.bincount(sc.fcos_level, minlength=len(s.strides)) for sc in s.scales]),
        (axes[1, 2], "boxes containing no point of the level",
         [sc.no_point for sc in s.scales]),
    ):
        for k, (scale, counts, color) in enumerate(zip(s.scales, values, _SCALE_COLORS)):
            bars = panel.bar(levels + (k - (len(s.scales) - 1) / 2) * width, counts, width,
                             color=color, label=scale.scale.name)
            panel.bar_label(bars, fontsize=7)
        panel.set_xticks(levels, [f"{n}\n(s={st})" for n, st in zip(s.level_names, s.strides)])
        panel.set_title(title)
        panel.set_ylabel("boxes")
        panel.legend(fontsize=7)
    never = ", ".join(f"{sc.no_point_at_all}" for sc in s.scales)
    axes[1, 2].set_title(f"boxes containing no point of the level\n"
                         f"(no point of any level: {never})", fontsize=10)
    fig.suptitle(f"{s.dataset_name}: {s.num_images} images, {s.num_boxes} boxes "
                 f"(strides {', '.join(map(str, s.strides))}; point offset {s.point_offset:g})")
    return save_figure(fig, output_path)


def _histograms(ax, summary, series, with_image_pixels=False):
    """Step histograms on shared log bins: one per input size (after the image pixels' one
    when ``with_image_pixels``), with the strides marked."""
    bins = _log_bins(np.concatenate(series))
    labels = ["image pixels"] * with_image_pixels + [sc.scale.name for sc in summary.scales]
    colors = ["black"] * with_image_pixels + list(_SCALE_COLORS)
    for values, label, color in zip(series, labels, colors):
        ax.hist(values, bins=bins, histtype="step", color=color, label=label)
    _mark_strides(ax, summary)
    ax.set_xscale("log")
    ax.legend(fontsize=7)


def _log_bins(values):
    positive = values[values > 0]
    low = max(positive.min() if len(positive) else 1.0, 0.5)
    high = max(values.max(), low * 2)
    return np.geomspace(low / 1.05, high * 1.05, 40)


def _mark_strides(ax, summary):
    """Dotted lines at the levels' strides, labelled ``s=8``, ``16``, ..."""
    for k, stride in enumerate(summary.strides):
        ax.axvline(stride, color="tab:purple", linewidth=0.6, linestyle=":")
        ax.text(stride, 0.99, f" {'s=' if k == 0 else ''}{stride}", color="tab:purple",
                transform=ax.get_xaxis_transform(), va="top", fontsize=7)
