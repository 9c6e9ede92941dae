"""RCOD Latent Metric: M_L (Eq. 4) estimated by MEM and/or measured against an HR image, and the t it picks."""

from __future__ import annotations


from .common import CATEGORY, MODEL, node_errors, to_bchw, ui_values
from .managed import image_pixels, use


class RCODLatentMetric:
    DESCRIPTION = ("Latent metric M_L = cos(z_L, z_H) (Eq. 4) and the timestep the model's grouping rule picks "
                   "for it (Eq. 5/6). Without HR: MEM's estimate (RCOD_S with MEM). With an HR image: also the "
                   "true M_L from the VAE latents of the upscaled LR and the HR.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "INT", "FLOAT")
    RETURN_NAMES = ("M_L", "t", "M_L_true")
    OUTPUT_TOOLTIPS = ("M_L that chose t: MEM's estimate, or the true M_L when the model has no MEM (first image).",
                       "The timestep chosen from M_L (first image).",
                       "The true M_L from the HR image (first image); NaN without an HR image.")
    FUNCTION = "measure"
    OUTPUT_NODE = True  # runs (and shows M_L, t) even when nothing uses its outputs

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "rcod_model": (MODEL, {"tooltip": "From RCOD Model Loader (RCOD_S with MEM for estimates)."}),
                "image": ("IMAGE", {"tooltip": "The low-resolution image(s)."}),
            },
            "optional": {
                "hr_image": ("IMAGE", {"tooltip": "The matching high-resolution image (same batch), for the true M_L."}),
            },
        }

    def measure(self, rcod_model, image, hr_image=None):
        with node_errors("RCOD Latent Metric"):
            use(rcod_model, image_pixels(image if hr_image is None else hr_image))
            lr = to_bchw(image)
            true = rcod_model.true_metric(lr, to_bchw(hr_image)) if hr_image is not None else None
            if rcod_model.has_mem or true is None:  # no MEM and no HR: rcod_core's error says what is needed
                metric = rcod_model.estimate_metric(lr.to(rcod_model.device))
            else:
                metric = true
            t = rcod_model.resolve_timesteps("adaptive", lr.shape[0], metric.float().cpu())
        ui = ui_values(t, metric)
        if true is not None:
            ui["rcod_m_l_true"] = [round(float(v), 4) for v in true.reshape(-1).tolist()]
        m_true = float(true.reshape(-1)[0]) if true is not None else float("nan")
        return {"ui": ui, "result": (float(metric.reshape(-1)[0]), int(t[0]), m_true)}
