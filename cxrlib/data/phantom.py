"""PhantomCXR: procedural chest-radiograph-like images that agree with a list of findings.

Real chest X-rays are not available without credentials, so the default data pairs real IU X-ray
reports with images drawn here from that report's own findings. The renderer builds an
attenuation ("density") map from simple analytic shapes (body wall, lungs, heart, mediastinum,
diaphragm, ribs, clavicles, spine, lung vessels), adds one layer per finding, and maps it to
brightness the way film does (``1 - exp(-gain * density)``): bone and fluid white, lungs dark.
Everything is vectorised numpy; a 144x128 image takes a few milliseconds
(``benchmarks/bench_phantom.py``). Introduced in notebook 01. One file on purpose (the longest of
the package): the anatomy, every finding's layer and the film response share one coordinate frame,
and the boxes the grounding tasks use are computed from the very shapes drawn.

Usage::

    from cxrlib.data.labels import Finding
    out = render([Finding("Pleural Effusion", side="left", severity="moderate")], view="PA",
                 size=(144, 128), patient_seed=7, acquisition_seed=0)
    out.image                 # (144, 128) uint8
    out.finding_boxes         # [(Finding(...), [x1, y1, x2, y2])] in pixels
    out.organ_boxes           # {"right lung": [...], "left lung": [...], "heart": [...]}

Seeds: the anatomy (body size, lung shape, heart size, rib spacing, where a nodule sits) comes
from ``patient_seed`` only, so a prior and a current study of one patient share it and a nodule
that "worsens" grows in place; ``acquisition_seed`` sets rotation, shift, zoom, exposure, noise.

What each observation looks like on a frontal (PA/AP) film:

- Enlarged Cardiomediastinum: the upper mediastinum widens (a broader white band above the heart).
- Cardiomegaly: the heart shadow grows; its cardio-thoracic ratio passes 0.5 (normal ~0.45).
- Lung Opacity: a faint, hazy, ill-defined area. Edema: perihilar "bat-wing" haze (bilateral
  unless a side is given; Kerley B lines when severe).
- Lung Lesion: a round, sharp nodule (mild/moderate) or a larger lobulated mass (severe).
- Consolidation: a dense opacity with dark air bronchograms. Pneumonia: clustered patchy opacity.
- Atelectasis: a thin plate-like band (two when severe).
- Pneumothorax: a dark rim without vessels at the apex and lateral wall, bounded by a thin white
  visceral pleural line (zone "upper" by default; bigger rim and longer extent when worse).
- Pleural Effusion: white fluid filling the costophrenic angle with a meniscus that climbs the
  chest wall (mild only blunts the angle; severe reaches mid-lung). Zone is ignored.
- Pleural Other: lobulated pleural thickening along the chest wall (an apical cap when upper).
- Fracture: a gap in a rib (mild), with a displaced fragment (moderate), on two ribs (severe).
- Support Devices: 1/2/3 devices (mild/moderate/severe) among ET tube, enteric tube, central
  line, pacemaker with leads, sternotomy wires; one box per device.

LATERAL films draw the same kinds of shapes in a side-on geometry (front of the chest on the image
left, heart anterior-inferior, spine posterior); both lungs overlap there, so ``side`` has no
effect and a bilateral finding gets one box. Effusions blunt the posterior sulcus, a pneumothorax
sits at the front of the apex, Enlarged Cardiomediastinum fills the retrosternal space.

Conventions: ``side`` is the patient's side ("left" = image right on frontal films). Severity
scales size and density (missing = moderate); an UNCERTAIN finding renders fainter (60%). A
missing side or zone is chosen deterministically from the patient seed and the observation
(``_DEFAULT_SIDES``, ``_DEFAULT_ZONES``), so both studies of a patient agree. A bilateral
finding gets one box per lung. A finding too small to cover a pixel (e.g. a mild nodule on a
16x16 image) draws nothing and gets no box. Organ boxes: "right lung", "left lung", "heart"
on PA/AP; "lungs" and "heart" on LATERAL.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import scipy.ndimage

from cxrlib.constants import CHEXPERT_LABELS, FRONTAL_VIEWS, LATERAL_VIEW, POSITIVE, UNCERTAIN
from cxrlib.data.labels import Finding

VIEWS = (*FRONTAL_VIEWS, LATERAL_VIEW)
OBSERVATIONS = tuple(name for name in CHEXPERT_LABELS if name != "No Finding")
SIDES = ("left", "right", "bilateral")
ZONES = ("upper", "middle", "lower")
SEVERITIES = ("mild", "moderate", "severe")
MIN_SIZE, MAX_SIZE = 16, 4096

# Zones a finding without a zone may be drawn in (chosen by patient seed and observation).
_DEFAULT_ZONES = {
    "Lung Opacity": ("middle", "lower"),
    "Lung Lesion": ("upper", "middle", "lower"),
    "Consolidation": ("middle", "lower"),
    "Pneumonia": ("middle", "lower"),
    "Atelectasis": ("lower",),
    "Pneumothorax": ("upper",),
    "Pleural Other": ("upper", "middle", "lower"),
    "Fracture": ("upper", "middle", "lower"),
}
# Sides a finding without a side may be drawn on; everything else picks left or right.
_DEFAULT_SIDES = {"Edema": ("bilateral",), "Pleural Effusion": ("right", "left", "bilateral")}

AIR = 0.7  # density the air in a lung removes from the body's soft tissue
VESSEL_FULL_RES = 300  # images at least this wide draw lung markings at half resolution
BOX_THRESHOLD = 0.2  # a finding's box covers pixels where its density is >= 20% of its peak


@dataclass
class Rendered:
    """One rendered image with the boxes of what was drawn.

    Attributes:
        image: (H, W) uint8, bright = dense (bone white, lungs dark).
        view: "PA" | "AP" | "LATERAL".
        finding_boxes: (finding, [x1, y1, x2, y2]) in pixels per rendered finding; bilateral
            findings have one entry per lung, Support Devices one per device.
        organ_boxes: "right lung", "left lung", "heart" (PA/AP) or "lungs", "heart" (LATERAL).
    """

    image: np.ndarray
    view: str
    finding_boxes: list[tuple[Finding, list[float]]] = field(default_factory=list)
    organ_boxes: dict[str, list[float]] = field(default_factory=dict)


# --- small vectorised helpers --------------------------------------------------------------------


def _smooth(x):
    """Smoothstep of ``x`` clipped to [0, 1]: a soft 0 -> 1 edge."""
    x = np.minimum(np.maximum(x, 0.0), 1.0)  # np.clip has more call overhead
    return x * x * (3.0 - 2.0 * x)


def _inside(d, width):
    """Soft mask of ``d > 0`` whose edge is ``width`` wide (d = signed distance, inside > 0)."""
    return _smooth(0.5 + d / width)


def _peaks(x, n=4):
    """``x ** (2 ** n)`` by repeated squaring (numpy's general power is ~40x slower)."""
    for _ in range(n):
        x = x * x
    return x


def _hypot(a, b):
    return np.sqrt(a * a + b * b)


def _stable_int(*parts) -> int:
    """A hash that is the same in every Python process (``hash`` of a str is salted)."""
    return zlib.crc32(repr(parts).encode())


class _Noise:
    """Smooth random texture in about [0, 1] (mean 0.5): a sum of random plane waves.

    One unit of the input coordinates is about one blob. (Sines are much faster in numpy than
    the gathers of lattice value noise.)
    """

    def __init__(self, rng: np.random.Generator, waves: int = 8):
        angle = rng.uniform(0, np.pi, waves)
        freq = np.pi * rng.uniform(0.7, 1.4, waves) * np.where(np.arange(waves) < 5, 1.0, 2.1)
        self.kx, self.ky = (freq * np.cos(angle)).tolist(), (freq * np.sin(angle)).tolist()
        self.phase = rng.uniform(0, 2 * np.pi, waves).tolist()
        self.weight = np.where(np.arange(waves) < 5, 1.0, 0.5)
        self.weight = (0.2 * self.weight / np.sqrt((self.weight**2).sum() / 2)).tolist()

    def __call__(self, x, y):
        out = 0.5
        for kx, ky, ph, wt in zip(self.kx, self.ky, self.phase, self.weight):
            out = out + wt * np.sin(kx * x + ky * y + ph)
        return out


@lru_cache(maxsize=8)
def _pixel_centres(h: int, w: int):
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    ys.flags.writeable = xs.flags.writeable = False
    return ys, xs


class _Frame:
    """Pixel grid <-> anatomical coordinates (u, v in [0, 1] across the unrotated image).

    The acquisition's small rotation, shift and zoom are applied by moving the grid, so every
    shape is evaluated directly at each pixel's anatomical position (no resampling).
    """

    def __init__(self, h, w, angle_deg, shift, zoom):
        self.h, self.w, self.asp = h, w, h / w
        self.c, self.s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
        self.tx, self.ty, self.zoom = shift[0] * w, shift[1] * h, zoom
        ys, xs = _pixel_centres(h, w)
        px, py = xs - w / 2 - self.tx, ys - h / 2 - self.ty
        self.u = ((self.c * px + self.s * py) / zoom + w / 2) / w
        self.v = ((-self.s * px + self.c * py) / zoom + h / 2) / h

    def to_pixel(self, u, v):
        """Anatomical (u, v) -> pixel (x, y) (arrays or floats)."""
        ax, ay = np.asarray(u) * self.w - self.w / 2, np.asarray(v) * self.h - self.h / 2
        x = self.zoom * (self.c * ax - self.s * ay) + self.w / 2 + self.tx
        y = self.zoom * (self.s * ax + self.c * ay) + self.h / 2 + self.ty
        return x, y

    def window(self, u1, v1, u2, v2):
        """Pixel slices covering the anatomical box [u1, u2] x [v1, v2], or None if off-image."""
        x, y = self.to_pixel([u1, u2, u1, u2], [v1, v1, v2, v2])
        x1, x2 = max(int(x.min()) - 1, 0), min(int(math.ceil(x.max())) + 1, self.w)
        y1, y2 = max(int(y.min()) - 1, 0), min(int(math.ceil(y.max())) + 1, self.h)
        if x1 >= x2 or y1 >= y2:
            return None
        return slice(y1, y2), slice(x1, x2)

    def box(self, u1, v1, u2, v2):
        """Pixel box [x1, y1, x2, y2] of an anatomical box, clipped to the image."""
        x, y = self.to_pixel([u1, u2, u1, u2], [v1, v1, v2, v2])
        return _clip_box([x.min(), y.min(), x.max(), y.max()], self.h, self.w)


def _clip_box(box, h, w):
    x1, y1, x2, y2 = box
    x1, x2 = float(np.clip(x1, 0, w)), float(np.clip(x2, 0, w))
    y1, y2 = float(np.clip(y1, 0, h)), float(np.clip(y2, 0, h))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [round(x1, 1), round(y1, 1), round(x2, 1), round(y2, 1)]


def _mask_box(mask, win):
    """Pixel box of the True pixels of ``mask`` (a window of the image), or None."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    ys, xs = win
    return [
        float(xs.start + cols[0]),
        float(ys.start + rows[0]),
        float(xs.start + cols[-1] + 1),
        float(ys.start + rows[-1] + 1),
    ]


def _polyline_distance(x, y, points):
    """Distance from each (x, y) to a polyline through ``points`` (N, 2), vectorised."""
    p = np.asarray(points, dtype=np.float32)
    a, b = p[:-1], p[1:]
    ab = b - a
    px, py = x[..., None] - a[:, 0], y[..., None] - a[:, 1]
    t = np.clip((px * ab[:, 0] + py * ab[:, 1]) / np.maximum((ab**2).sum(1), 1e-12), 0, 1)
    dx, dy = px - t * ab[:, 0], py - t * ab[:, 1]
    return np.sqrt((dx * dx + dy * dy).min(axis=-1))


def _bezier(p0, p1, p2, n=12):
    """Points of a quadratic Bezier curve (tubes and lines are drawn along these)."""
    t = np.linspace(0, 1, n, dtype=np.float32)[:, None]
    p0, p1, p2 = (np.asarray(q, dtype=np.float32) for q in (p0, p1, p2))
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2


# --- the patient and the acquisition ------------------------------------------------------------


@dataclass
class _Patient:
    """Anatomy drawn from ``patient_seed`` (all lengths in image fractions)."""

    lung_w: float  # frontal: lateral lung edge, distance from the midline
    lung_v_wide: float  # height where the lungs are widest
    apex_v: float  # top of the lungs
    dome_r: float  # right hemidiaphragm dome height
    dome_l: float  # left hemidiaphragm dome (usually lower)
    dome_k: float  # how much the diaphragm falls from dome to costophrenic angle
    med_w: float  # upper mediastinum half-width
    knob: float  # aortic knob bulge (patient's left)
    heart_dx: float  # heart centre offset to the patient's left
    heart_a: float  # heart semi-axes and tilt (degrees)
    heart_b: float
    heart_tilt: float
    rib_v0: float  # first posterior rib and rib spacing
    rib_sp: float
    clav_v: float  # clavicle height at the midline
    body_w: float  # body half-width (skin)
    hilum_v: float
    vessel_phase: tuple  # phases of the lung-marking pattern
    gas_u: float  # gastric bubble position (fraction of the left lung width)
    lat_ant: float  # lateral view: anterior lung edge (sternum) and posterior lung edge
    lat_post: float
    scale: float  # overall body size (zoom of the anatomy)
    seed: int


def _draw_patient(patient_seed: int) -> _Patient:
    r = np.random.default_rng([patient_seed, 0x9A71E27])
    dome_r = r.uniform(0.62, 0.68)
    return _Patient(
        lung_w=r.uniform(0.37, 0.41),
        lung_v_wide=r.uniform(0.55, 0.62),
        apex_v=r.uniform(0.09, 0.12),
        dome_r=dome_r,
        dome_l=dome_r + r.uniform(0.01, 0.04),
        dome_k=r.uniform(0.08, 0.11),
        med_w=r.uniform(0.055, 0.07),
        knob=r.uniform(0.02, 0.035),
        heart_dx=r.uniform(0.025, 0.05),
        heart_a=r.uniform(0.16, 0.18),
        heart_b=r.uniform(0.13, 0.15),
        heart_tilt=r.uniform(12, 25),
        rib_v0=r.uniform(0.10, 0.12),
        rib_sp=r.uniform(0.047, 0.054),
        clav_v=r.uniform(0.15, 0.18),
        body_w=r.uniform(0.44, 0.48),
        hilum_v=r.uniform(0.37, 0.42),
        vessel_phase=tuple(r.uniform(0, 2 * np.pi, 6)),
        gas_u=r.uniform(0.3, 0.6),
        lat_ant=r.uniform(0.19, 0.23),
        lat_post=r.uniform(0.83, 0.87),
        scale=r.uniform(0.95, 1.04),
        seed=patient_seed,
    )


@dataclass
class _Acquisition:
    angle: float
    shift: tuple
    zoom: float
    gain: float  # exposure: density -> brightness
    lo: float  # display window
    hi: float
    gamma: float
    noise: float
    noise_seed: int


def _draw_acquisition(acquisition_seed: int, view: str, patient: _Patient) -> _Acquisition:
    r = np.random.default_rng([acquisition_seed, 0xAC9])
    portable = view == "AP"  # bedside films: less contrast, more noise
    return _Acquisition(
        angle=r.uniform(-2.5, 2.5),
        shift=(r.uniform(-0.025, 0.025), r.uniform(-0.02, 0.02)),
        zoom=patient.scale * r.uniform(0.97, 1.03),
        gain=r.uniform(1.25, 1.5) * (0.9 if portable else 1.0),
        lo=r.uniform(0.10, 0.16),
        hi=r.uniform(0.86, 0.95) + (0.05 if portable else 0.0),
        gamma=r.uniform(0.85, 1.1),
        noise=r.uniform(0.008, 0.018) * (1.5 if portable else 1.0),
        noise_seed=int(r.integers(2**31)),
    )


# --- the scene: view geometry shared by the anatomy and the findings -------------------------------


@dataclass
class _Lung:
    """One lung field of a view, with the soft mask and the distances to its borders."""

    name: str  # "right" | "left" (frontal) or "both" (lateral)
    mask: np.ndarray  # (H, W) in [0, 1]
    d_top: np.ndarray  # distance below the apex curve
    d_wall: np.ndarray  # distance inside the chest wall (frontal: lateral; lateral: posterior)
    d_ptx: np.ndarray  # distance inside the wall where a pneumothorax collects
    d_dia: np.ndarray  # distance above the diaphragm
    ubox: tuple  # anatomical bounding box (u1, v1, u2, v2)
    v_apex: float
    v_base: float  # dome height: zones split [v_apex, v_base] in thirds
    v_cp: float  # costophrenic angle height
    span: object  # v -> (u_min, u_max) of the lung at that height
    hilum: tuple  # (u, v)
    outward: float  # +1: u grows towards the wall (patient's left / posterior), -1 otherwise


class _Scene:
    """Everything a finding needs: frame, density map, lungs, the patient and the view."""

    def __init__(self, frame, patient, view, density):
        self.frame, self.p, self.view = frame, patient, view
        self.d = density
        self.lungs: dict[str, _Lung] = {}
        self.vessels = None  # lung-marking density (a pneumothorax removes it)
        self.heart_box = None  # anatomical box of the heart shadow
        rng = np.random.default_rng([patient.seed, 0x7E57])
        self.textures = [_Noise(rng) for _ in range(4)]  # lung markings

    @property
    def frontal(self):
        return self.view != LATERAL_VIEW

    def lungs_for(self, side):
        if not self.frontal:
            return [self.lungs["both"]]
        return (
            [self.lungs["right"], self.lungs["left"]] if side == "bilateral" else [self.lungs[side]]
        )

    def zone_band(self, lung, zone):
        third = (lung.v_base - lung.v_apex) / 3
        k = ZONES.index(zone)
        return lung.v_apex + k * third, lung.v_apex + (k + 1) * third

    def place(self, lung, zone, rng, margin=0.05):
        """A point in ``zone`` of ``lung``, kept ``margin`` away from its borders."""
        v1, v2 = self.zone_band(lung, zone)
        v = rng.uniform(v1 + 0.25 * (v2 - v1), v2 - 0.25 * (v2 - v1))
        lo, hi = lung.span(v)
        lo, hi = lo + margin, hi - margin
        if hi <= lo:
            lo = hi = 0.5 * (lo + hi)
        return float(rng.uniform(lo, hi)), float(v)

    def add(self, win, delta, threshold=BOX_THRESHOLD):
        """Add a finding's density in a window; return the pixel box of its visible part."""
        if win is None:
            return None
        self.d[win] += delta
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        if peak <= 1e-6:
            return None
        return _mask_box(np.abs(delta) >= threshold * peak, win)


# --- frontal anatomy ------------------------------------------------------------------------------


def _frontal_med_w(p, v, side, widen=0.0):
    """Half-width of the mediastinum at height v (plus the aortic knob on the left)."""
    w = p.med_w * (0.8 + 0.2 * _smooth((v - 0.05) / 0.15))
    # Below the hila the mediastinum widens into the heart (no lung between them).
    w = w + (0.05 if side == "left" else 0.035) * _smooth((v - p.hilum_v + 0.06) / 0.14)
    if side == "left":
        w = w + p.knob * np.exp(-(((v - 0.26) / 0.035) ** 2))
    if widen:
        w = w + widen * _smooth((v - 0.11) / 0.08) * _smooth((0.50 - v) / 0.08)
    return w


def _frontal_s_lat(p, v):
    """Lateral lung edge (distance from the midline): an elliptic arc, widest low in the chest."""
    t = np.clip((p.lung_v_wide - v) / (p.lung_v_wide - p.apex_v + 0.03), 0, 1)
    return p.lung_w * np.sqrt(1 - t * t)


def _embed(part, win, shape, fill=0.0):
    """A full-image array that holds ``part`` in window ``win`` and ``fill`` elsewhere."""
    out = np.full(shape, fill, dtype=np.float32)
    if win is not None:
        out[win] = part
    return out


def _lung_from_parts(scene, win, mask, d_top, d_wall, d_ptx, d_dia, **info):
    """Embed a lung computed inside its window (outside it: no lung, distances negative)."""
    shape = scene.d.shape
    return _Lung(
        mask=_embed(mask, win, shape),
        d_top=_embed(d_top, win, shape, -1.0),
        d_wall=_embed(d_wall, win, shape, -1.0),
        d_ptx=_embed(d_ptx, win, shape, -1.0),
        d_dia=_embed(d_dia, win, shape, -1.0),
        **info,
    )


def _frontal_lung(scene, side, widen):
    p = scene.p
    sgn = 1.0 if side == "left" else -1.0
    dome = p.dome_l if side == "left" else p.dome_r
    v_cp = dome + p.dome_k * ((p.lung_w - 0.18) / 0.2) ** 2
    u_lo, u_hi = (0.5, 0.5 + p.lung_w) if sgn > 0 else (0.5 - p.lung_w, 0.5)
    ubox = (u_lo, p.apex_v - 0.02, u_hi, v_cp + 0.02)
    win = scene.frame.window(ubox[0] - 0.03, ubox[1] - 0.03, ubox[2] + 0.03, ubox[3] + 0.03)
    win = win or (slice(0, 1), slice(0, 1))
    u, v = scene.frame.u[win], scene.frame.v[win]
    s = sgn * (u - 0.5)
    d_top = v - (p.apex_v + 1.2 * np.maximum(0.1 - s, 0) ** 2)
    d_lat = _frontal_s_lat(p, v) - s
    d_med = s - _frontal_med_w(p, v, side, widen)
    d_dia = dome + p.dome_k * ((s - 0.18) / 0.2) ** 2 - v
    mask = (
        _inside(d_top, 0.02) * _inside(d_lat, 0.03) * _inside(d_med, 0.015) * _inside(d_dia, 0.01)
    )

    def span(vv, _side=side):
        s_hi = float(_frontal_s_lat(p, vv))
        s_lo = float(_frontal_med_w(p, np.float32(vv), _side, widen))
        if vv > p.hilum_v:  # stay off the heart shadow
            s_lo = max(s_lo, 0.2 if _side == "left" else 0.13)
        return (0.5 + s_lo, 0.5 + s_hi) if sgn > 0 else (0.5 - s_hi, 0.5 - s_lo)

    return _lung_from_parts(
        scene,
        win,
        mask,
        d_top,
        d_lat,
        np.minimum(d_lat, d_top),
        d_dia,
        name=side,
        ubox=ubox,
        v_apex=p.apex_v,
        v_base=dome,
        v_cp=v_cp,
        span=span,
        hilum=(0.5 + sgn * 0.11, p.hilum_v),
        outward=sgn,
    )


def _heart_mask(frame, cu, cv, a, b, tilt, win):
    u, v = frame.u[win] - cu, (frame.v[win] - cv) * frame.asp
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    x, y = c * u + s * v, -s * u + c * v
    r = np.sqrt((x / a) ** 2 + (y / (b * frame.asp)) ** 2)
    return _inside(1 - r, 0.12)


def _ellipse_ubox(cu, cv, a, b, tilt, asp):
    """Anatomical bounding box of a tilted ellipse (semi-axes a, b in u units, b scaled by asp)."""
    c, s = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    bb = b * asp
    hx = math.hypot(a * c, bb * s)
    hy = math.hypot(a * s, bb * c) / asp
    return cu - hx, cv - hy, cu + hx, cv + hy


def _vessel_texture(scene, hila, win):
    """Lung markings: vessels radiating from the hila, branching (more, thinner) outwards.

    Large images evaluate the texture on every second pixel and interpolate (vessels are a few
    pixels wide there), which halves the renderer's time at 582x518.
    """
    f = scene.frame
    u, v = f.u[win], f.v[win]
    if f.w < VESSEL_FULL_RES:
        return _vessel_pattern(scene, hila, u, v)
    coarse = _vessel_pattern(scene, hila, u[::2, ::2], v[::2, ::2])
    zoom = (u.shape[0] / coarse.shape[0], u.shape[1] / coarse.shape[1])
    return scipy.ndimage.zoom(coarse, zoom, order=1, grid_mode=True, mode="nearest")


def _vessel_pattern(scene, hila, u, v):
    f = scene.frame
    ph = scene.p.vessel_phase
    if len(hila) == 2:  # frontal: mirror so both lungs use the same formula
        left = u > 0.5  # the hila sit symmetrically about the midline
        dx = np.abs(u - 0.5) - (hila[1][0] - 0.5)
        hv = hila[0][1]
        phase = ph[0] + (ph[1] - ph[0]) * left
    else:
        hu, hv = hila[0]
        dx, phase = u - hu, ph[0]
    dy = (v - hv) * f.asp
    r = np.sqrt(dx * dx + dy * dy) + 1e-4
    theta = np.arctan2(dy, dx)
    noise = scene.textures
    wobble = theta + 0.5 * (noise[3](u / 0.07, v / 0.07) - 0.5)
    out = 0.0
    layers = ((7, 0.0055, 0.0, 1.0), (13, 0.004, 0.07, 0.8), (23, 0.003, 0.14, 0.6))
    for i, (n, width, r0, amp) in enumerate(layers):
        c = 1 - np.cos(n * wobble + phase * (i + 1))
        ridge = np.exp(-c * (r / (n * width)) ** 2)
        # Break the rays into tapered segments so they read as branching vessels.
        pieces = _smooth((noise[i](u / 0.035, v / 0.035) - 0.3) / 0.3)
        out = out + amp * ridge * pieces * _smooth((r - r0) / 0.05)
    return out * np.exp(-r / 0.17) + 0.8 * np.exp(-((r / 0.04) ** 2))


def _rib_distance(p, s, v, k, view):
    """Signed vertical distance to the centre line of rib ``k`` (posterior ribs)."""
    k = np.asarray(k, dtype=np.float32)
    if view == LATERAL_VIEW:
        centre = p.rib_v0 + 0.02 + k * p.rib_sp * 1.05 + 0.45 * (0.85 - s)
    else:
        centre = p.rib_v0 + k * p.rib_sp * (1 + 0.03 * k) - 0.25 * s + 0.9 * s * s
        centre = centre + 4.0 * np.maximum(s - 0.28, 0) ** 2
    return v - centre


def _rib_layer(p, s, v, view, breaks=(), u=None):
    """Density of the posterior ribs at outward distance s (frontal: both sides at once).

    ``breaks`` are fractures ``(rib, s_f, gap, step, side)``: a gap at s_f and a step of the
    fragment lateral to it; side +1/-1 limits a break to the image right/left half (needs u).
    """
    half = 0.24 * p.rib_sp
    # Nearest rib: the rib index is roughly linear in v at fixed s.
    k0 = np.rint(_rib_distance(p, s, v, 0, view) / (p.rib_sp * 1.1)).astype(np.int32)
    best = None
    for dk in (-1, 0, 1):
        k = np.clip(k0 + dk, 0, 11)
        d = _rib_distance(p, s, v, k, view)
        gaps = 0.0
        for rib, s_f, gap, step, side in breaks:
            here = k == rib
            if side:
                here = here & ((u - 0.5) * side > 0)
            d = d - here * (step * _smooth((s - s_f) / 0.004) * _smooth((s_f + 0.09 - s) / 0.04))
            gaps = gaps + here * _inside(gap - np.abs(s - s_f), 0.004)
        band = _inside(half - np.abs(d), 0.008) * (0.75 + 0.35 * _smooth(np.abs(d) / half))
        band = band * (1 - np.minimum(gaps, 1)) * (k <= 10)
        best = band if best is None else np.maximum(best, band)
    return best


def _frontal_anatomy(scene, mods):
    f, p, d = scene.frame, scene.p, scene.d
    u, v = f.u, f.v
    s = np.abs(u - 0.5)
    portable = scene.view == "AP"

    # Body: a barrel of soft tissue, neck and shoulders at the top, arms beside the upper chest.
    body_w = p.body_w * (0.3 + 0.7 * _smooth((v + 0.03) / 0.15)) * (0.94 + 0.06 * _smooth(v / 0.6))
    thick = 0.35 + 0.65 * np.sqrt(np.clip(1 - (s / body_w) ** 2, 0, 1))
    body = _inside(body_w - s, 0.015)
    d += body * thick
    scene.thick = thick
    win = f.window(0.0, -0.05, 1.0, 0.45)
    if win is not None:  # arms beside the upper chest
        uw, vw = f.u[win], f.v[win]
        arms = _inside(s[win] - body_w[win] - 0.025, 0.02) * _inside(0.3 - vw, 0.12)
        d[win] += 0.55 * arms * _inside(vw - 0.02, 0.06)

    # Lungs: air lowers the density in proportion to the chest's thickness.
    for side in ("right", "left"):
        scene.lungs[side] = _frontal_lung(scene, side, mods.get("widen", 0.0))
    lung = scene.lungs["right"].mask + scene.lungs["left"].mask
    d -= AIR * lung * thick
    hila = [scene.lungs["right"].hilum, scene.lungs["left"].hilum]
    ub = scene.lungs["right"].ubox[:2] + scene.lungs["left"].ubox[2:]
    win = f.window(*ub)
    if win is not None:
        texture = 0.16 * _vessel_texture(scene, hila, win) * lung[win]
        scene.vessels = _embed(texture, win, d.shape)
        d[win] += texture
    else:
        scene.vessels = np.zeros_like(d)

    # Gastric bubble under the left hemidiaphragm.
    gu, gv = 0.5 + 0.1 + p.gas_u * 0.12, p.dome_l + 0.045
    win = f.window(gu - 0.08, gv - 0.05, gu + 0.08, gv + 0.05)
    if win is not None:
        g = ((f.u[win] - gu) / 0.055) ** 2 + ((f.v[win] - gv) / 0.025) ** 2
        d[win] -= 0.22 * _inside(1 - g, 0.6) * _inside(f.v[win] - (p.dome_l + 0.022), 0.01)

    # Heart: a tilted ellipse sitting on the diaphragm, shifted to the patient's left.
    fa, fb = mods.get("heart_scale", (1.0, 1.0))
    a, b = p.heart_a * fa, p.heart_b * 1.2 * fb
    if portable:  # AP films magnify the heart (it is far from the detector)
        a, b = a * 1.07, b * 1.04
    cu, cv = 0.5 + p.heart_dx + 0.3 * (a - p.heart_a), p.dome_r + 0.01
    hbox = _ellipse_ubox(cu, cv, a, b, p.heart_tilt, f.asp)
    win = f.window(*hbox)
    if win is not None:
        uw, vw = f.u[win], f.v[win]
        sw = np.abs(uw - 0.5)
        dome = p.dome_r + (p.dome_l - p.dome_r) * (uw > 0.5)
        below = _inside(vw - (dome + p.dome_k * ((sw - 0.18) / 0.2) ** 2), 0.01)
        heart = _heart_mask(f, cu, cv, a, b, p.heart_tilt, win) * (1 - below)
        d[win] += heart * (0.12 + AIR * 0.9 * lung[win] * thick[win])
    scene.heart_box = (hbox[0], hbox[1], hbox[2], min(hbox[3], p.dome_r + 0.035))

    # Mediastinum: the trachea (air, darker); hilar vessels are in the lung texture.
    win = f.window(0.44, -0.05, 0.56, p.hilum_v)
    if win is not None:
        uw, vw = f.u[win], f.v[win]
        trachea = _inside(0.017 - np.abs(uw - 0.5 - 0.006 * (vw - 0.1) / 0.2), 0.012)
        d[win] -= 0.12 * trachea * _inside(p.hilum_v - 0.07 - vw, 0.03) * _inside(vw + 0.02, 0.03)

    # Spine: vertebral bodies with disc spaces, seen through the mediastinum.
    win = f.window(0.44, -0.05, 0.56, 1.05)
    if win is not None:
        vw = f.v[win]
        discs = _peaks(np.cos(np.pi * (vw - p.rib_v0) / (p.rib_sp * 1.05)), 4)
        d[win] += 0.16 * _inside(0.038 - s[win], 0.015) * (1 - 0.5 * discs)

    # Ribs: arched posterior ribs and fainter oblique anterior ribs, inside the chest wall.
    win = f.window(0.5 - p.body_w, p.rib_v0 - 0.08, 0.5 + p.body_w, 1.05)
    if win is not None:
        uw, vw, sw, bw = f.u[win], f.v[win], s[win], body_w[win]
        wall = _inside(sw - 0.035, 0.02) * _inside(bw - 0.03 - sw, 0.02)
        d[win] += 0.1 * _rib_layer(p, sw, vw, scene.view, mods["breaks"], uw) * wall
        ant_centre = p.rib_v0 + 0.16 + 0.5 * (bw - sw)
        ant = _peaks(np.cos(np.pi * (vw - ant_centre) / (p.rib_sp * 1.3)), 3)
        d[win] += 0.05 * ant * _inside(sw - 0.14, 0.05) * wall * _inside(p.dome_r - vw, 0.1)

    # Clavicles: S-shaped bands from the sternal notch to the shoulders (higher on AP films).
    cv0 = p.clav_v - (0.05 if portable else 0.0)
    win = f.window(0.1, cv0 - 0.12, 0.9, cv0 + 0.04)
    if win is not None:
        vw, sw = f.v[win], s[win]
        centre = cv0 - 0.2 * sw + 0.5 * np.maximum(sw - 0.22, 0) ** 2
        clav = _inside(0.012 - np.abs(vw - centre), 0.008) * _inside(sw - 0.03, 0.01)
        d[win] += 0.22 * clav * _inside(0.38 - sw, 0.03)
    if portable:  # the scapulae project over the upper lungs on AP films
        scap = _inside(0.06 - _hypot((s - p.lung_w + 0.02) / 1.2, (v - 0.25) / 1.8), 0.02)
        d += 0.06 * scap


# --- lateral anatomy ------------------------------------------------------------------------------


def _lateral_lung(scene):
    p = scene.p
    dome = p.dome_r + 0.01
    v_cp = dome + 0.12 * ((p.lat_post - 0.42) / 0.42) ** 2
    ubox = (p.lat_ant - 0.03, p.apex_v - 0.02, p.lat_post, v_cp + 0.02)
    win = scene.frame.window(ubox[0] - 0.03, ubox[1] - 0.03, ubox[2] + 0.03, ubox[3] + 0.03)
    win = win or (slice(0, 1), slice(0, 1))
    u, v = scene.frame.u[win], scene.frame.v[win]
    u_ant = p.lat_ant + 0.05 * (0.45 - v)
    u_post = p.lat_post - 0.4 * np.maximum(0.3 - v, 0) ** 2
    d_top = v - (p.apex_v + 1.2 * (u - 0.55) ** 2)
    d_ant, d_post = u - u_ant, u_post - u
    d_dia = dome + 0.12 * ((u - 0.42) / 0.42) ** 2 - v
    mask = (
        _inside(d_top, 0.04) * _inside(d_ant, 0.02) * _inside(d_post, 0.03) * _inside(d_dia, 0.012)
    )

    def span(vv):
        lo = p.lat_ant + 0.05 * (0.45 - vv)
        if vv > p.hilum_v:  # stay behind the heart
            lo = max(lo, p.lat_ant + 0.32)
        return lo, p.lat_post - 0.4 * max(0.3 - vv, 0) ** 2

    return _lung_from_parts(
        scene,
        win,
        mask,
        d_top,
        d_post,
        np.minimum(d_ant, d_top),
        d_dia,
        name="both",
        ubox=ubox,
        v_apex=p.apex_v,
        v_base=dome,
        v_cp=v_cp,
        span=span,
        hilum=(0.54, p.hilum_v + 0.02),
        outward=1.0,
    )


def _lateral_heart(p, mods):
    fa, fb = mods.get("heart_scale", (1, 1))
    a, b = p.heart_a * 1.2 * fa, p.heart_b * 0.85 * fb
    cu, cv = p.lat_ant + 0.17 + 0.35 * (a - p.heart_a * 1.2), p.dome_r - 0.02
    return cu, cv, a, b, -50.0


def _lateral_anatomy(scene, mods):
    f, p, d = scene.frame, scene.p, scene.d
    u, v = f.u, f.v
    # Body seen from the side: chest front (image left) to back (image right), neck at the top.
    top = _smooth((v + 0.02) / 0.16)
    centre, half = 0.53 + 0.06 * (1 - top), 0.41 - 0.2 * (1 - top)
    thick = 1.1 * (0.4 + 0.6 * np.sqrt(np.clip(1 - ((u - centre) / half) ** 2, 0, 1)))
    d += _inside(half - np.abs(u - centre), 0.02) * thick
    scene.thick = thick
    # Arms and shoulders overlap the upper chest.
    d += 0.2 * _inside(0.3 - _hypot((u - 0.5) / 1.4, (v - 0.02) / 0.6), 0.15)

    lung = _lateral_lung(scene)
    scene.lungs["both"] = lung
    d -= AIR * lung.mask * thick
    win = f.window(*lung.ubox)
    if win is not None:
        texture = 0.12 * _vessel_texture(scene, [lung.hilum], win) * lung.mask[win]
        scene.vessels = _embed(texture, win, d.shape)
        d[win] += texture
    else:
        scene.vessels = np.zeros_like(d)
    below = _inside(-lung.d_dia, 0.012)
    # The second hemidiaphragm: a faint edge a little lower.
    d += 0.08 * _inside(-(lung.d_dia + 0.03), 0.01) * lung.mask

    # Heart: anterior and inferior against the sternum, retrosternal clear space above it.
    cu, cv, a, b, tilt = _lateral_heart(p, mods)
    hbox = _ellipse_ubox(cu, cv, a, b, tilt, f.asp)
    win = f.window(*hbox)
    if win is not None:
        heart = _heart_mask(f, cu, cv, a, b, tilt, win) * (1 - below[win])
        d[win] += heart * (0.1 + AIR * 0.75 * lung.mask[win] * thick[win])
    scene.heart_box = (
        max(hbox[0], p.lat_ant - 0.02),
        hbox[1],
        hbox[2],
        min(hbox[3], p.dome_r + 0.06),
    )

    # Trachea: an air column running down and back to the hilum.
    track = 0.47 + 0.2 * v
    trachea = _inside(0.017 - np.abs(u - track), 0.012) * _inside(p.hilum_v - 0.03 - v, 0.04)
    d -= 0.09 * trachea

    # Spine: vertebral bodies with disc spaces, behind them the posterior elements.
    u_sp = 0.74 + 0.25 * (v - 0.4) ** 2
    discs = _peaks(np.cos(np.pi * (v - p.rib_v0) / (p.rib_sp * 1.05)), 4)
    d += 0.2 * _inside(0.04 - np.abs(u - u_sp), 0.01) * (1 - 0.6 * discs)
    d += 0.06 * _inside(0.03 - np.abs(u - u_sp - 0.085), 0.02)
    sternum = _inside(0.007 - np.abs(u - (p.lat_ant + 0.05 * (0.45 - v)) + 0.012), 0.006)
    d += 0.18 * sternum * _inside(v - 0.17, 0.02) * _inside(0.6 - v, 0.03)

    # Ribs: faint oblique posterior ribs behind the lungs.
    ribs = _rib_layer(p, u, v, LATERAL_VIEW, mods["breaks"])
    d += 0.07 * ribs * _inside(u - 0.5, 0.08) * _inside(p.lat_post + 0.02 - u, 0.02)


# --- findings -------------------------------------------------------------------------------------


@dataclass
class _Spec:
    """A finding with its missing side/zone/severity resolved and its drawing strength."""

    finding: Finding
    side: str
    zone: str
    sev: int  # 0 mild, 1 moderate, 2 severe
    amp: float  # 1 for positive, fainter for uncertain
    rng_seed: list


def _resolve(finding, patient_seed, index_of_kind):
    obs = finding.observation
    key = _stable_int(patient_seed, obs)
    side = finding.side
    if side is None:
        options = _DEFAULT_SIDES.get(obs, ("right", "left"))
        side = options[key % len(options)]
    zone = finding.zone
    if zone is None:
        options = _DEFAULT_ZONES.get(obs, ("middle",))
        zone = options[(key // 7) % len(options)]
    sev = 1 if finding.severity is None else SEVERITIES.index(finding.severity)
    amp = 1.0 if finding.status == POSITIVE else 0.6
    # Position depends on patient, observation, side and zone, not on severity: a finding that
    # worsens between a prior and a current study grows in place.
    seed = [patient_seed, _stable_int(obs), SIDES.index(side), ZONES.index(zone), index_of_kind]
    return _Spec(finding, side, zone, sev, amp, seed)


def _rng(spec, *extra):
    return np.random.default_rng([*spec.rng_seed, *(_stable_int(e) for e in extra)])


def _blob_window(scene, cu, cv, radius):
    return scene.frame.window(
        cu - radius, cv - radius / scene.frame.asp, cu + radius, cv + radius / scene.frame.asp
    )


def _local(scene, win, cu, cv):
    """Offsets (in width units, isotropic) of the window's pixels from (cu, cv)."""
    f = scene.frame
    return f.u[win] - cu, (f.v[win] - cv) * f.asp


def _draw_opacity(scene, spec, lung, kind):
    """Lung Opacity (hazy), Consolidation (dense, air bronchograms), Pneumonia (patchy)."""
    rng = _rng(spec, lung.outward > 0)
    cu, cv = scene.place(lung, spec.zone, rng, margin=0.06)
    noise = _Noise(rng)
    radius = {"Lung Opacity": (0.07, 0.10, 0.14), "Consolidation": (0.05, 0.075, 0.11),
              "Pneumonia": (0.06, 0.085, 0.12)}[kind][spec.sev]  # fmt: skip
    win = _blob_window(scene, cu, cv, radius * 1.8)
    if win is None:
        return None
    x, y = _local(scene, win, cu, cv)
    r = np.sqrt(x * x + (y * 1.2) ** 2) / radius
    n = noise(x / 0.035 + 4, y / 0.035 + 4)
    if kind == "Lung Opacity":
        delta = (0.12 + 0.05 * spec.sev) * np.exp(-(r**2) * 1.3) * (0.7 + 0.6 * n)
    elif kind == "Consolidation":
        edge = _inside(1 + 0.6 * (n - 0.5) - r, 0.3)
        delta = (0.3 + 0.05 * spec.sev) * edge * (0.85 + 0.3 * n)
        # Air bronchograms: dark branching tubes inside the dense region.
        hx, hy = lung.hilum[0] - cu, (lung.hilum[1] - cv) * scene.frame.asp
        ang = np.arctan2(y - hy, x - hx)
        dist = _hypot(x - hx, y - hy)
        tubes = np.exp(-(1 - np.cos(11 * ang + 0.2 * np.sin(dist * 40))) * (dist / 0.02) ** 2)
        delta = delta - 0.28 * delta * tubes * _inside(0.8 - r, 0.3)
    else:  # Pneumonia: clustered patchy airspace opacities on a faint haze
        fine = noise(x / 0.018 + 9, y / 0.018 + 2)
        patches = 0.3 + 0.7 * _smooth((0.6 * n + 0.4 * fine - 0.38) / 0.3)
        delta = (0.3 + 0.06 * spec.sev) * patches * _inside(1 - r, 0.5)
    delta = delta * spec.amp * lung.mask[win]
    return scene.add(win, delta)


def _draw_lesion(scene, spec, lung):
    rng = _rng(spec, lung.outward > 0)
    radius = (0.022, 0.04, 0.07)[spec.sev]
    cu, cv = scene.place(lung, spec.zone, rng, margin=0.03 + radius)
    noise = _Noise(rng)
    win = _blob_window(scene, cu, cv, radius * 1.5)
    if win is None:
        return None
    x, y = _local(scene, win, cu, cv)
    ang = np.arctan2(y, x)
    lobes = 1 + (0.12 * spec.sev) * np.sin(5 * ang + rng.uniform(0, 6)) * (
        noise(np.cos(ang) * 2 + 5, np.sin(ang) * 2 + 5) - 0.2
    )
    r = np.sqrt(x * x + y * y) / (radius * lobes)
    sphere = np.sqrt(np.clip(1 - r * r, 0, 1))  # a ball is densest in the middle
    delta = (0.3 + 0.05 * spec.sev) * spec.amp * (0.35 * _inside(1 - r, 0.12) + 0.65 * sphere)
    return scene.add(win, delta * np.maximum(lung.mask[win], 0.5))


def _draw_atelectasis(scene, spec, lung):
    rng = _rng(spec, lung.outward > 0)
    cu, cv = scene.place(lung, spec.zone, rng, margin=0.07)
    length = (0.10, 0.15, 0.2)[spec.sev]
    thick = (0.008, 0.012, 0.018)[spec.sev]
    tilt = math.radians(rng.uniform(-18, 18)) * lung.outward
    win = _blob_window(scene, cu, cv, length * 0.65)
    if win is None:
        return None
    x, y = _local(scene, win, cu, cv)
    c, s = math.cos(tilt), math.sin(tilt)
    along, across = c * x + s * y, -s * x + c * y
    delta = 0.0
    for k in range(1 + (spec.sev == 2)):  # severe: two plates
        off = 0.03 * k
        taper = _inside(length / 2 * (1 - 0.2 * k) - np.abs(along - off * 0.3), 0.02)
        delta = delta + _inside(thick - np.abs(across + off), 0.006) * taper
    delta = (0.5 + 0.05 * spec.sev) * spec.amp * np.minimum(delta, 1) * lung.mask[win]
    return scene.add(win, delta)


def _draw_edema(scene, spec, lung):
    rng = _rng(spec, lung.outward > 0)
    hu, hv = lung.hilum
    cu, cv = hu + lung.outward * 0.04, hv + 0.04
    sx, sy = (0.09, 0.12, 0.15)[spec.sev], (0.10, 0.13, 0.17)[spec.sev]
    noise = _Noise(rng)
    win = scene.frame.window(cu - 2 * sx, cv - 2 * sy, cu + 2 * sx, cv + 2 * sy)
    if win is None:
        return None
    x, y = scene.frame.u[win] - cu, scene.frame.v[win] - cv
    haze = np.exp(-((x / sx) ** 2) - (y / sy) ** 2)
    fluffy = 0.6 + 0.8 * noise(x / 0.03 + 2, y / 0.03 + 2)
    delta = (0.2 + 0.07 * spec.sev) * haze * fluffy
    if spec.sev == 2:  # Kerley B lines: short horizontal lines at the lateral lung bases
        kerley = _peaks(np.cos(np.pi * y / 0.012), 4) * _inside(0.04 - lung.d_wall[win], 0.01)
        delta = delta + 0.1 * kerley * _inside(y - 0.08, 0.02)
    return scene.add(win, delta * spec.amp * lung.mask[win])


def _draw_effusion(scene, spec, lung):
    """Fluid in the costophrenic angle with a meniscus that climbs the chest wall."""
    p = scene.p
    h = (0.05, 0.13, 0.24)[spec.sev]
    u1, v1, u2, v2 = lung.ubox
    top_wall = lung.v_cp - h
    win = scene.frame.window(u1, top_wall - 0.04, u2, v2 + 0.03)
    if win is None:
        return None
    dwall = lung.d_wall[win]
    v = scene.frame.v[win]
    # The fluid level falls away from the wall along a concave curve (the meniscus).
    reach = 0.9 * (lung.v_cp - p.dome_r) + 0.35 * h
    v_top = top_wall + reach * np.sqrt(np.clip(dwall / 0.25, 0, 1))
    depth = v - v_top
    fluid = _inside(depth, 0.015) * (0.85 + 0.2 * _smooth(depth / 0.1))
    # Fluid replaces the lung's air, so the hemidiaphragm's outline disappears behind it.
    delta = AIR * spec.amp * fluid * lung.mask[win] * scene.thick[win]
    return scene.add(win, delta)


def _draw_pleural_other(scene, spec, lung):
    rng = _rng(spec, lung.outward > 0)
    w = (0.012, 0.02, 0.03)[spec.sev]
    v1, v2 = scene.zone_band(lung, spec.zone)
    if spec.zone == "upper":
        v1 = lung.v_apex - 0.03
    noise = _Noise(rng)
    u1, _, u2, _ = lung.ubox
    win = scene.frame.window(u1 - 0.02, v1 - 0.03, u2 + 0.02, v2 + 0.03)
    if win is None:
        return None
    v = scene.frame.v[win]
    wall = lung.d_ptx[win] if spec.zone == "upper" else lung.d_wall[win]
    lobulated = w * (0.6 + 0.9 * noise(v / 0.03 + 1, scene.frame.u[win] / 0.03 + 1))
    band = _inside(lobulated - wall, 0.006) * _inside(v - v1, 0.02) * _inside(v2 - v, 0.02)
    delta = 0.4 * spec.amp * band * _inside(lung.mask[win] - 0.05, 0.1)
    return scene.add(win, delta)


def _draw_pneumothorax(scene, spec, lung):
    """Lucent rim without lung markings between the chest wall and a thin pleural line."""
    w = (0.025, 0.045, 0.08)[spec.sev]
    v1, v2 = scene.zone_band(lung, spec.zone)
    extent = (0.12, 0.22, 0.45)[spec.sev]
    if spec.zone == "upper":
        v1, v2 = lung.v_apex - 0.03, lung.v_apex + extent
    else:
        v1, v2 = v1 - 0.05, v2 + 0.05 * spec.sev
    u1, _, u2, _ = lung.ubox
    win = scene.frame.window(u1 - 0.02, v1, u2 + 0.02, v2 + 0.05)
    if win is None:
        return None
    v = scene.frame.v[win]
    band = _inside(v - v1, 0.01) * _inside(v2 - v, 0.06)
    if not scene.frontal:  # lateral: air collects at the front of the apex
        band = band * _inside(0.6 - scene.frame.u[win], 0.05)
    dist = lung.d_ptx[win]
    rim = _inside(w - dist, 0.004) * lung.mask[win] * band
    line = np.exp(-(((dist - w) / 0.0035) ** 2)) * band * _inside(lung.mask[win] - 0.2, 0.2)
    delta = -scene.vessels[win] * rim - 0.12 * rim + 0.22 * line
    return scene.add(win, delta * spec.amp)


def _draw_fracture_box(scene, lung, plan):
    """Box around the rib breaks of one plan (the breaks themselves are drawn with the ribs)."""
    p, f = scene.p, scene.frame
    boxes = []
    for brk in plan:
        rib, s_f, gap, step, _ = brk
        centre = -float(_rib_distance(p, np.float32(s_f), np.float32(0.0), rib, scene.view))
        u_f = 0.5 + lung.outward * s_f if scene.frontal else s_f
        win = f.window(u_f - 0.13, centre - 0.05, u_f + 0.13, centre + 0.08 + step)
        if win is None:
            continue
        ss = np.abs(f.u[win] - 0.5) if scene.frontal else f.u[win]
        uu, vv = f.u[win], f.v[win]
        change = np.abs(
            _rib_layer(p, ss, vv, scene.view, [brk], uu) - _rib_layer(p, ss, vv, scene.view)
        )
        if change.max() > 0:
            boxes.append(_mask_box(change >= BOX_THRESHOLD * change.max(), win))
    if not boxes:
        return None
    x1, y1 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x2, y2 = max(b[2] for b in boxes), max(b[3] for b in boxes)
    return _clip_box([x1 - 1, y1 - 1, x2 + 1, y2 + 1], f.h, f.w)


def _plan_fractures(scene, spec, lung_name):
    """Which ribs break, where along the rib, how wide the gap and how big the step."""
    p = scene.p
    rng = _rng(spec, lung_name)
    first = {"upper": 2, "middle": 5, "lower": 8}[spec.zone] + int(rng.integers(0, 2))
    n = (1, 1, 2)[spec.sev]
    gap = (0.012, 0.016, 0.02)[spec.sev] * (0.7 if spec.amp < 1 else 1)
    step = (0.0, 0.45, 0.8)[spec.sev] * 0.33 * p.rib_sp * 2 * spec.amp
    if scene.frontal:
        s_f = rng.uniform(0.22, p.lung_w - 0.04)
    else:
        s_f = rng.uniform(0.55, p.lat_post - 0.06)
    side = {"right": -1, "left": 1}.get(lung_name, 0)
    return [(first + i, s_f + 0.01 * i, gap, step, side) for i in range(n)]


_DEVICES = ("ett", "enteric", "central_line", "pacemaker", "sternotomy")


def _device_paths(scene, device, side):
    """Polylines (anatomical u, v) of one device, with width and density (metal is denser)."""
    p = scene.p
    if scene.frontal:
        sg = 1.0 if side == "left" else -1.0  # patient's left = image right
        carina = p.hilum_v - 0.08
        if device == "ett":
            return [(np.array([[0.502, -0.02], [0.503, carina - 0.05]]), 0.006, 0.55)]
        if device == "enteric":
            pts = np.vstack([_bezier((0.49, -0.02), (0.51, 0.35), (0.525, p.dome_l + 0.02)),
                             _bezier((0.525, p.dome_l + 0.02), (0.56, p.dome_l + 0.1), (0.64, p.dome_l + 0.07))])  # fmt: skip
            return [(pts, 0.004, 0.5)]
        if device == "central_line":
            start = (0.5 + sg * 0.3, p.clav_v - 0.01)
            pts = _bezier(start, (0.5 + sg * 0.12, p.clav_v + 0.02), (0.47, p.hilum_v - 0.02))
            return [(pts, 0.004, 0.5)]
        if device == "pacemaker":
            gu, gv = 0.5 + sg * 0.26, p.clav_v + 0.06
            lead1 = _bezier((gu, gv), (0.5 + sg * 0.05, p.clav_v + 0.02), (0.46, p.hilum_v + 0.12))
            lead2 = _bezier((gu, gv), (0.47, p.hilum_v - 0.04), (0.56, p.dome_r - 0.02))
            box = np.array([[gu - 0.045, gv], [gu + 0.045, gv]])
            return [(box, 0.028, 1.3), (lead1, 0.0035, 0.9), (lead2, 0.0035, 0.9)]
        if device == "sternotomy":
            paths = []
            for k in range(5):
                vv = p.hilum_v - 0.12 + k * 0.055
                ang = np.linspace(0, 2 * np.pi, 13)
                ring = np.stack([0.5 + 0.018 * np.cos(ang), vv + 0.01 * np.sin(ang)], 1)
                paths.append((ring, 0.003, 1.0))
            return paths
    else:
        ua = p.lat_ant
        if device == "ett":
            return [
                (
                    np.array([[0.467, -0.02], [0.47 + 0.18 * (p.hilum_v - 0.1), p.hilum_v - 0.1]]),
                    0.006,
                    0.55,
                )
            ]
        if device == "enteric":
            pts = _bezier((0.52, -0.02), (0.6, 0.4), (0.45, p.dome_r + 0.08))
            return [(pts, 0.004, 0.5)]
        if device == "central_line":
            return [(_bezier((0.4, p.clav_v - 0.02), (0.43, 0.25), (0.45, p.hilum_v)), 0.004, 0.5)]
        if device == "pacemaker":
            gu, gv = ua + 0.02, p.clav_v + 0.03
            lead = _bezier((gu, gv), (0.45, 0.3), (ua + 0.12, p.dome_r - 0.03))
            box = np.array([[gu - 0.012, gv - 0.015], [gu + 0.012, gv + 0.015]])
            return [(box, 0.015, 1.3), (lead, 0.0035, 0.9)]
        if device == "sternotomy":
            paths = []
            for k in range(5):
                vv = 0.22 + k * 0.06
                uu = ua + 0.05 * (0.45 - vv) - 0.012
                paths.append(
                    (np.array([[uu - 0.006, vv - 0.012], [uu + 0.006, vv + 0.012]]), 0.003, 1.0)
                )
            return paths
    raise AssertionError(device)


def _draw_devices(scene, spec):
    rng = _rng(spec)
    n = (1, 2, 3)[spec.sev]
    order = rng.permutation(len(_DEVICES))
    side = "right" if spec.side == "right" else "left"
    boxes = []
    f = scene.frame
    for idx in order[:n]:
        device = _DEVICES[int(idx)]
        if device == "central_line":
            side_d = "left" if spec.side == "left" else "right"
        else:
            side_d = side if spec.finding.side in ("left", "right") else "left"
        paths = _device_paths(scene, device, side_d)
        allp = np.vstack([pts for pts, _, _ in paths])
        pad = max(w for _, w, _ in paths) + 0.01
        win = f.window(
            allp[:, 0].min() - pad,
            allp[:, 1].min() - pad,
            allp[:, 0].max() + pad,
            allp[:, 1].max() + pad,
        )
        if win is None:
            continue
        x, y = f.u[win], f.v[win] * f.asp
        delta = 0.0
        for pts, width, dens in paths:
            dist = _polyline_distance(x, y, pts * np.array([1.0, f.asp], dtype=np.float32))
            delta = np.maximum(delta, dens * _inside(width - dist, 0.003))
        box = scene.add(win, delta * spec.amp)
        if box is not None:
            boxes.append(box)
    return boxes


# --- the public function ----------------------------------------------------------------------------


def _check_size(size):
    if not isinstance(size, tuple | list | np.ndarray) or len(size) != 2:
        raise ValueError(f"size must be a pair (height, width) of ints, got {size!r}")
    try:
        h, w = (int(x) for x in size)
    except (TypeError, ValueError):
        raise ValueError(f"size must be a pair (height, width) of ints, got {size!r}") from None
    if any(int(x) != x for x in size):
        raise ValueError(f"size must hold whole numbers, got {size!r}")
    if min(h, w) < MIN_SIZE or max(h, w) > MAX_SIZE:
        raise ValueError(
            f"impossible image size {h}x{w}: height and width must be between {MIN_SIZE} "
            f"and {MAX_SIZE} pixels (e.g. size=(144, 128))"
        )
    return h, w


def _check_seed(name, seed):
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{name} must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_finding(finding):
    obs = getattr(finding, "observation", None)
    if obs is None:
        raise ValueError(
            f"findings must be Finding objects (cxrlib.data.labels.Finding), got {finding!r}; "
            "convert dicts with Finding.from_dict"
        )
    if obs == "No Finding":
        return False
    if obs not in OBSERVATIONS:
        raise ValueError(f"unknown observation {obs!r}; expected one of {list(OBSERVATIONS)}")
    for name, allowed in (("side", SIDES), ("zone", ZONES), ("severity", SEVERITIES)):
        value = getattr(finding, name)
        if value is not None and value not in allowed:
            raise ValueError(
                f"{obs}: unknown {name} {value!r}; expected one of {list(allowed)} or None"
            )
    if finding.status not in (POSITIVE, UNCERTAIN):
        raise ValueError(
            f"{obs}: status {finding.status!r} is neither POSITIVE (1) nor UNCERTAIN (-1)"
        )
    return True


def render(
    findings: Sequence[Finding],
    view: str = "PA",
    size: tuple[int, int] = (144, 128),
    patient_seed: int = 0,
    acquisition_seed: int = 0,
) -> Rendered:
    """Render one chest-radiograph-like image showing ``findings``.

    Args:
        findings: the study's findings (``Finding`` records); "No Finding" draws nothing.
        view: "PA", "AP" (portable: magnified heart, lower contrast, more noise) or "LATERAL".
        size: (height, width) in pixels, each 16..4096.
        patient_seed: anatomy (and where findings sit); share it between studies of one patient.
        acquisition_seed: rotation, shift, exposure and noise of this film.

    Returns:
        A ``Rendered`` with the uint8 image, the view, one pixel box per rendered finding
        (per lung for bilateral ones, per device for Support Devices) and the organ boxes.

    Raises:
        ValueError: an impossible size, an unknown view or observation, or a negative seed.
    """
    if not isinstance(view, str) or view.upper() not in VIEWS:
        raise ValueError(f"unknown view {view!r}; expected one of {list(VIEWS)}")
    view = view.upper()
    h, w = _check_size(size)
    patient_seed = _check_seed("patient_seed", patient_seed)
    acquisition_seed = _check_seed("acquisition_seed", acquisition_seed)
    if isinstance(findings, Finding) or isinstance(findings, str | bytes):
        raise ValueError("findings must be a sequence of Finding objects (wrap one in a list)")
    todo = [f for f in findings if _check_finding(f)]

    patient = _draw_patient(patient_seed)
    acq = _draw_acquisition(acquisition_seed, view, patient)
    frame = _Frame(h, w, acq.angle, acq.shift, acq.zoom)
    scene = _Scene(frame, patient, view, np.zeros((h, w), dtype=np.float32))

    counts: dict[str, int] = {}
    specs = []
    for f in todo:
        specs.append(_resolve(f, patient_seed, counts.get(f.observation, 0)))
        counts[f.observation] = counts.get(f.observation, 0) + 1

    # Findings that change the anatomy itself are applied before the anatomy is drawn.
    mods: dict = {"breaks": []}
    fracture_plans = []
    for spec in specs:
        obs = spec.finding.observation
        if obs == "Cardiomegaly":
            grow = (0.3, 0.45, 0.65)[spec.sev] * (0.5 if spec.amp < 1 else 1)
            fa, fb = mods.get("heart_scale", (1.0, 1.0))
            mods["heart_scale"] = (max(fa, 1 + grow), max(fb, 1 + 0.3 * grow))
        elif obs == "Enlarged Cardiomediastinum" and scene.frontal:
            mods["widen"] = max(mods.get("widen", 0.0), (0.03, 0.05, 0.075)[spec.sev] * spec.amp)
        elif obs == "Fracture":
            names = (
                ["both"]
                if not scene.frontal
                else (["right", "left"] if spec.side == "bilateral" else [spec.side])
            )
            for name in names:
                plan = _plan_fractures(scene, spec, name)
                mods["breaks"].extend(plan)
                fracture_plans.append((spec, name, plan))

    (_frontal_anatomy if scene.frontal else _lateral_anatomy)(scene, mods)

    boxes: list[tuple[Finding, list[float]]] = []
    for spec in specs:
        obs = spec.finding.observation
        found = []
        if obs == "Cardiomegaly":
            found = [frame.box(*scene.heart_box)]
        elif obs == "Enlarged Cardiomediastinum":
            found = [_draw_mediastinum(scene, spec)]
        elif obs == "Fracture":
            for s2, name, plan in fracture_plans:
                if s2 is spec:
                    found.append(
                        _draw_fracture_box(
                            scene, scene.lungs["both" if not scene.frontal else name], plan
                        )
                    )
        elif obs == "Support Devices":
            found = _draw_devices(scene, spec)
        else:
            draw = {
                "Lung Opacity": lambda sc, sp, lu: _draw_opacity(sc, sp, lu, "Lung Opacity"),
                "Consolidation": lambda sc, sp, lu: _draw_opacity(sc, sp, lu, "Consolidation"),
                "Pneumonia": lambda sc, sp, lu: _draw_opacity(sc, sp, lu, "Pneumonia"),
                "Lung Lesion": _draw_lesion,
                "Edema": _draw_edema,
                "Atelectasis": _draw_atelectasis,
                "Pleural Effusion": _draw_effusion,
                "Pleural Other": _draw_pleural_other,
                "Pneumothorax": _draw_pneumothorax,
            }[obs]
            found = [draw(scene, spec, lung) for lung in scene.lungs_for(spec.side)]
        boxes.extend((spec.finding, b) for b in found if b is not None)

    image = _expose(scene.d, acq, h, w)
    return Rendered(image=image, view=view, finding_boxes=boxes, organ_boxes=_organ_boxes(scene))


def _draw_mediastinum(scene, spec):
    """Enlarged Cardiomediastinum: frontal = widened mediastinum (drawn with the anatomy);
    lateral = soft tissue filling the retrosternal space."""
    p, f = scene.p, scene.frame
    if scene.frontal:
        wmax = p.med_w + p.knob + (0.03, 0.05, 0.075)[spec.sev] + 0.01
        return f.box(0.5 - wmax, 0.12, 0.5 + wmax, p.hilum_v + 0.08)
    lung = scene.lungs["both"]
    depth = (0.06, 0.09, 0.13)[spec.sev]
    win = f.window(p.lat_ant - 0.02, 0.1, p.lat_ant + depth + 0.08, p.hilum_v + 0.1)
    if win is None:
        return None
    u, v = f.u[win], f.v[win]
    front = p.lat_ant + 0.05 * (0.45 - v)
    region = (
        _inside(front + depth - u, 0.03)
        * _inside(v - 0.14, 0.03)
        * _inside(p.hilum_v + 0.05 - v, 0.04)
    )
    return scene.add(win, 0.45 * spec.amp * region * lung.mask[win])


def _organ_boxes(scene):
    f = scene.frame
    out = {}
    names = ("right", "left") if scene.frontal else ("both",)
    for name in names:
        lung = scene.lungs[name]
        win = f.window(*lung.ubox)
        if win is None:
            continue
        box = _mask_box(lung.mask[win] > 0.5, win)
        if box is not None:
            out["lungs" if name == "both" else f"{name} lung"] = box
    heart = f.box(*scene.heart_box)
    if heart is not None:
        out["heart"] = heart
    return out


def _expose(density, acq, h, w):
    """Density -> film brightness, display window, quantum noise, 8 bits."""
    bright = 1.0 - np.exp(-acq.gain * np.maximum(density, 0))
    bright = np.clip((bright - acq.lo) / (acq.hi - acq.lo), 0, 1) ** acq.gamma
    noise = np.random.default_rng(acq.noise_seed).standard_normal((h, w), dtype=np.float32)
    bright = bright + acq.noise * noise * (0.5 + bright)
    return (np.clip(bright, 0, 1) * 255 + 0.5).astype(np.uint8)
