"""A CarRacing with gymnasium's physics and a fast renderer.

`FastCarRacing` subclasses gymnasium's `CarRacing`: track generation, Box2D physics, rewards, termination
and every use of the random generator are gymnasium's own code, so the same seed and actions give the
same rewards, terminations and car state at every step. Only the drawing is replaced.

Gymnasium draws the road with pygame on a 1000x800 canvas and then area-averages it down to 96x96; 97 %
of a step is spent there. Here the same camera (zoom animation, rotation by the car angle, the
translation that keeps the car at a quarter of the height) is composed into one affine map straight to
the output grid. Polygons are filled with OpenCV on a canvas only `supersample` times the output size and
box-filtered down, which is what pygame's smoothscale does to the big canvas. The HUD (black bar, speed,
four ABS sensors, steering, gyro and the score text) consists of axis-aligned rectangles, drawn on a
supersampled strip of the HUD rows only, and one text patch, box-filtered exactly and cached per label:
no large intermediate canvas anywhere.

`obs_size` and `crop_hud` give the world-model observations directly: `crop_hud=True` renders only the
top 700 of the 800 window rows, i.e. gymnasium's `obs[:84]` (the World Models crop), straight at
`obs_size`.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Any, NamedTuple

import cv2
import numpy as np
from gymnasium import spaces
from gymnasium.envs.box2d import car_dynamics
from gymnasium.envs.box2d.car_racing import (
    GRASS_DIM,
    PLAYFIELD,
    SCALE,
    STATE_H,
    STATE_W,
    VIDEO_H,
    VIDEO_W,
    WINDOW_H,
    WINDOW_W,
    ZOOM,
    CarRacing,
)
from gymnasium.utils import EzPickle

from dreamlab.errors import DreamlabError

#: window rows above the HUD (the HUD is the bottom 5/40 of the window: rows 700..800)
SCENE_H = WINDOW_H - 5 * WINDOW_H / 40.0
_FIXED_BITS = 4  # sub-pixel bits of the OpenCV polygon coordinates
_FIXED = float(1 << _FIXED_BITS)
_UNIT_CORNERS = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
_STRIPE = np.zeros((4, 2))  # placeholder for a wheel stripe, whose shape depends on the wheel's phase
_HUD_SUPERSAMPLE = 4  # sub-samples per output pixel of the HUD strip


def _grass_polys() -> np.ndarray:
    """The 400 grass patches of gymnasium's `_render_road`, as a (400, 4, 2) array."""
    polys = []
    for x in range(-20, 20, 2):
        for y in range(-20, 20, 2):
            polys.append([
                (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + 0),
                (GRASS_DIM * x + 0, GRASS_DIM * y + 0),
                (GRASS_DIM * x + 0, GRASS_DIM * y + GRASS_DIM),
                (GRASS_DIM * x + GRASS_DIM, GRASS_DIM * y + GRASS_DIM),
            ])
    return np.asarray(polys, dtype=np.float64)


_GRASS = _grass_polys()
_FIELD = np.asarray([[(PLAYFIELD, PLAYFIELD), (PLAYFIELD, -PLAYFIELD), (-PLAYFIELD, -PLAYFIELD),
                      (-PLAYFIELD, PLAYFIELD)]], dtype=np.float64)


@functools.lru_cache(maxsize=16)
def _area_matrix(n_out: int, n_in: int, scale: float) -> np.ndarray:
    """(n_out, n_in) box-filter weights: output pixel i averages window pixels overlapping [i, i+1)/scale."""
    r = np.arange(n_in, dtype=np.float64)
    j = np.arange(n_out, dtype=np.float64)[:, None]
    return np.clip(np.minimum((r + 1.0) * scale, j + 1.0) - np.maximum(r * scale, j), 0.0, 1.0)


class _CarParts(NamedTuple):
    bodies: list[Any]
    local: np.ndarray    # (V, 2) vertices of every fixture polygon in body coordinates
    body_of: np.ndarray  # (V,) index of each vertex's body
    batches: list[tuple[list[tuple[int, int]], tuple[int, int, int]]]  # wheels first, then the hull
    wheels: list[int]    # indices of the wheel bodies (they carry a white stripe)


class FastCarRacing(CarRacing):
    """gymnasium's CarRacing (same physics, tracks and rewards) with a renderer drawing at the output size.

    Extra arguments over gymnasium's: `obs_size` (int or (height, width) of the observation),
    `crop_hud` (drop the HUD rows as World Models does, i.e. render gymnasium's `obs[:84]` region) and
    `supersample` (sub-samples per output pixel along each axis; the default 2 matches gymnasium's
    observations within ~0.4/255 per pixel at 64x64, 4 within ~0.2/255, at some speed).
    """

    metadata = {"render_modes": ["human", "rgb_array", "state_pixels"], "render_fps": CarRacing.metadata["render_fps"]}

    def __init__(
        self,
        render_mode: str | None = None,
        verbose: bool = False,
        lap_complete_percent: float = 0.95,
        domain_randomize: bool = False,
        continuous: bool = True,
        obs_size: int | tuple[int, int] = (STATE_H, STATE_W),
        crop_hud: bool = False,
        supersample: int = 2,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise DreamlabError(f"render_mode={render_mode!r} is not supported; choose one of None, "
                                + ", ".join(self.metadata["render_modes"]))
        size = (obs_size, obs_size) if isinstance(obs_size, int) else tuple(obs_size)
        if len(size) != 2 or not all(isinstance(v, (int, np.integer)) and 8 <= v <= 1024 for v in size):
            raise DreamlabError(f"obs_size={obs_size!r} must be an int or (height, width) with values in 8..1024")
        if not isinstance(supersample, (int, np.integer)) or not 1 <= supersample <= 16:
            raise DreamlabError(f"supersample={supersample!r} must be an int in 1..16")
        super().__init__(render_mode=render_mode, verbose=verbose, lap_complete_percent=lap_complete_percent,
                         domain_randomize=domain_randomize, continuous=continuous)
        EzPickle.__init__(self, render_mode, verbose, lap_complete_percent, domain_randomize, continuous,
                          obs_size, crop_hud, supersample)
        self.obs_h, self.obs_w = int(size[0]), int(size[1])
        self.crop_hud = bool(crop_hud)
        self.supersample = int(supersample)
        self.observation_space = spaces.Box(low=0, high=255, shape=(self.obs_h, self.obs_w, 3), dtype=np.uint8)
        self._road_src: list | None = None
        self._road_pts = np.zeros((0, 4, 2))
        self._road_lo = self._road_hi = np.zeros((0, 2))
        self._road_rgb = np.zeros((0, 3))
        self._text_cache: OrderedDict[tuple, tuple[np.ndarray, np.ndarray, slice, slice]] = OrderedDict()
        self._font: Any = None
        self._car_src: Any = None
        self._car_cache = _CarParts([], np.zeros((0, 2)), np.zeros(0, int), [], [])

    # ------------------------------------------------------------------ rendering entry points
    def _render(self, mode: str) -> Any:
        assert mode in self.metadata["render_modes"]
        if "t" not in self.__dict__ or self.car is None:
            return None  # reset() not called yet
        if mode == "state_pixels":
            obs = self.draw(self.obs_h, self.obs_w, crop_hud=self.crop_hud, supersample=self.supersample)
            return _darken(obs, _smoothscale_bias(STATE_W, STATE_H))
        if mode == "rgb_array":
            frame = self.draw(VIDEO_H, VIDEO_W, supersample=2, particles=True)
            return _darken(frame, _smoothscale_bias(VIDEO_W, VIDEO_H))
        return self._render_human()

    def _render_human(self) -> None:
        import pygame

        if self.screen is None:
            pygame.display.init()
            self.screen = pygame.display.set_mode((WINDOW_W, WINDOW_H))
        if self.clock is None:
            self.clock = pygame.time.Clock()
        frame = self.draw(WINDOW_H, WINDOW_W, supersample=1, particles=True)
        pygame.event.pump()
        self.clock.tick(self.metadata["render_fps"])
        pygame.surfarray.blit_array(self.screen, frame.transpose(1, 0, 2))
        pygame.display.flip()

    # ------------------------------------------------------------------ the rasterizer
    def draw(self, out_h: int, out_w: int, *, crop_hud: bool = False, supersample: int = 2,
             particles: bool = False) -> np.ndarray:
        """The current view as gymnasium would show it resized to (out_h, out_w), as uint8 (out_h, out_w, 3).

        `crop_hud=True` maps only the window rows above the HUD onto the output.
        """
        car = self.car
        assert car is not None
        k = supersample
        fx = out_w / WINDOW_W
        fy = out_h / SCENE_H if crop_hud else out_h / WINDOW_H
        # output rows that show the scene (the rest is the HUD)
        scene_rows = out_h if crop_hud else min(out_h, math.ceil(SCENE_H * fy - 1e-9))
        cw, ch = out_w * k, scene_rows * k

        # gymnasium's camera: rotate by -car angle, zoom (animated during the first second), translate so the
        # car sits at (W/2, H/4), flip vertically; then scale the window to the output and the supersampled canvas
        angle = -car.hull.angle
        zoom = 0.1 * SCALE * max(1 - self.t, 0) + ZOOM * SCALE * min(self.t, 1)
        c, s = math.cos(angle), math.sin(angle)
        px, py = car.hull.position
        sx_, sy_ = -px * zoom, -py * zoom
        tx = WINDOW_W / 2 + (c * sx_ - s * sy_)
        ty = WINDOW_H / 4 + (s * sx_ + c * sy_)
        ax, ay = k * fx * _FIXED, k * fy * _FIXED
        # canvas (fixed point) = L @ (x, y) + o; pixel centres of the canvas sit at integer coordinates
        l00, l01, l10, l11 = ax * zoom * c, -ax * zoom * s, -ay * zoom * s, -ay * zoom * c
        o0, o1 = ax * tx - 0.5 * _FIXED, ay * (WINDOW_H - ty) - 0.5 * _FIXED
        L = np.array([[l00, l01], [l10, l11]])
        o = np.array([o0, o1])
        Lt = L.T

        def project(pts: np.ndarray) -> np.ndarray:
            return np.rint(pts @ Lt + o).astype(np.int32)

        canvas = np.empty((ch, cw, 3), np.uint8)
        if ch > 0:
            # the view rectangle in world coordinates (axis-aligned bounds of its 4 corners)
            det = l00 * l11 - l01 * l10
            xs, ys = [], []
            for u, v in ((0.0, 0.0), (cw * _FIXED, 0.0), (0.0, ch * _FIXED), (cw * _FIXED, ch * _FIXED)):
                u, v = u - o0, v - o1
                xs.append((l11 * u - l01 * v) / det)
                ys.append((-l10 * u + l00 * v) / det)
            x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
            fill = cv2.fillConvexPoly
            if -PLAYFIELD <= x0 and x1 <= PLAYFIELD and -PLAYFIELD <= y0 and y1 <= PLAYFIELD:
                cv2.rectangle(canvas, (0, 0), (cw - 1, ch - 1), _color(self.bg_color), -1)
            else:
                canvas.fill(0)
                fill(canvas, project(_FIELD[0]), _color(self.bg_color), cv2.LINE_8, _FIXED_BITS)
            # grass patches overlapping the view: a regular grid (every other cell), picked arithmetically
            gx = range(max(-20, 2 * math.floor((x0 / GRASS_DIM - 1) / 2)), min(20, math.floor(x1 / GRASS_DIM) + 1), 2)
            gy = range(max(-20, 2 * math.floor((y0 / GRASS_DIM - 1) / 2)), min(20, math.floor(y1 / GRASS_DIM) + 1), 2)
            if gx and gy:
                idx = [((i + 20) // 2) * 20 + (j + 20) // 2 for i in gx for j in gy]
                # the patches never overlap, so one fillPoly call draws them all
                cv2.fillPoly(canvas, project(_GRASS[idx]), _color(self.grass_color), cv2.LINE_8, _FIXED_BITS)
            # road tiles and kerbs in gymnasium's order, culled by their world bounds
            self._sync_road()
            if len(self._road_pts):
                lo, hi = self._road_lo, self._road_hi
                vis = np.flatnonzero((hi[:, 0] >= x0) & (lo[:, 0] <= x1) & (hi[:, 1] >= y0) & (lo[:, 1] <= y1))
                if len(vis):
                    polys = project(self._road_pts[vis])
                    # int() of gymnasium's float colours truncates, as astype does
                    colors = self._road_rgb[vis].astype(np.int32).tolist()
                    for poly, color in zip(polys, colors):
                        fill(canvas, poly, color, cv2.LINE_8, _FIXED_BITS)
            if particles:
                thick = max(1, int(round(2 * k * fx)))
                for p in car.particles:
                    pts = project(np.asarray(p.poly, dtype=np.float64))
                    cv2.polylines(canvas, [pts], False, _color(p.color), thick, cv2.LINE_8, _FIXED_BITS)
            self._draw_car(canvas, L, o)
            scene = _downsample(canvas, k)
        else:
            scene = canvas[:0:k, :cw:k]
        if crop_hud:
            return scene
        out = np.zeros((out_h, out_w, 3), np.uint8)
        out[:scene_rows] = scene
        return self._draw_hud(out, fx, out_h / WINDOW_H)

    def _sync_road(self) -> None:
        """Cache the road polygons and colours as arrays whenever reset() made a new `road_poly` list.

        A tile's colour is recoloured in place by gymnasium's FrictionDetector (`tile.color[:] = ...`) when
        the car touches it; the tiles' colour arrays are therefore re-pointed to rows of one (M, 3) array
        (same values, same in-place semantics), so all visible colours are read in one operation.
        """
        if self._road_src is self.road_poly and len(self._road_rgb) == len(self.road_poly):
            return
        self._road_src = self.road_poly
        n = len(self.road_poly)
        self._road_pts = np.asarray([poly for poly, _ in self.road_poly], dtype=np.float64).reshape(n, 4, 2)
        self._road_lo = self._road_pts.min(axis=1)
        self._road_hi = self._road_pts.max(axis=1)
        rgb = np.asarray([np.asarray(color, dtype=np.float64) for _, color in self.road_poly]).reshape(n, 3)
        tiles = {id(t.color): t for t in (self.road or []) if isinstance(getattr(t, "color", None), np.ndarray)}
        for i, (poly, color) in enumerate(self.road_poly):
            tile = tiles.get(id(color))
            if tile is not None and tile.color.shape == (3,) and tile.color.dtype == rgb.dtype:
                tile.color = rgb[i]  # a view: FrictionDetector's in-place writes land in `rgb`
                self.road_poly[i] = (poly, tile.color)
        self._road_rgb = rgb

    def _car_parts(self) -> _CarParts:
        """The car's drawn bodies and polygons as flat arrays, cached per Car object."""
        car = self.car
        if self._car_src is not car:
            bodies = list(car.drawlist)
            local, body_of, polys = [], [], []
            n = 0
            for i, obj in enumerate(bodies):
                color = tuple(int(v * 255) for v in obj.color)
                for f in obj.fixtures:
                    verts = np.asarray(f.shape.vertices, dtype=np.float64)
                    local.append(verts)
                    body_of += [i] * len(verts)
                    polys.append((n, n + len(verts), color, "phase" in obj.__dict__))
                    n += len(verts)
            # cv2.fillPoly fills several polygons in one call with the even-odd rule, so a batch must hold
            # polygons of one colour that do not overlap: the wheels; hull fixtures 1+3 and 2+4 (1 and 2 overlap)
            wheels = [p for p in polys if p[3]]
            hull = [p for p in polys if not p[3]]
            batches = [([(p[0], p[1]) for p in wheels], wheels[0][2])] if wheels else []
            if len(hull) == 4:
                batches += [([(hull[0][0], hull[0][1]), (hull[2][0], hull[2][1])], hull[0][2]),
                            ([(hull[1][0], hull[1][1]), (hull[3][0], hull[3][1])], hull[1][2])]
            else:
                batches += [([(p[0], p[1])], p[2]) for p in hull]
            wheel_index = [i for i, obj in enumerate(bodies) if "phase" in obj.__dict__]
            self._car_src = car
            self._car_cache = _CarParts(bodies, np.concatenate(local), np.asarray(body_of), batches, wheel_index)
        return self._car_cache

    def _draw_car(self, canvas: np.ndarray, L: np.ndarray, o: np.ndarray) -> None:
        """Hull and wheels (with their rotating white stripe) as `Car.draw` draws them, without particles.

        Wheels do not overlap each other and each stripe lies inside its wheel, so drawing all wheels, then
        all stripes, then the hull gives the same picture as gymnasium's wheel, stripe, ..., hull order.
        """
        parts = self._car_parts()
        bodies = parts.bodies
        state = np.empty((len(bodies), 3))
        for k, obj in enumerate(bodies):
            p = obj.position
            state[k] = (p[0], p[1], obj.angle)
        ca, sa = np.cos(state[:, 2]), np.sin(state[:, 2])
        # body -> canvas affine maps of all bodies at once: M_b = L @ R_b, off_b = L @ p_b + o
        Mt = np.empty((len(bodies), 2, 2))  # transposed: row vector @ Mt
        Mt[:, 0, 0] = L[0, 0] * ca + L[0, 1] * sa
        Mt[:, 1, 0] = -L[0, 0] * sa + L[0, 1] * ca
        Mt[:, 0, 1] = L[1, 0] * ca + L[1, 1] * sa
        Mt[:, 1, 1] = -L[1, 0] * sa + L[1, 1] * ca
        off = state[:, :2] @ L.T + o
        bi = parts.body_of
        lv = parts.local
        pts = np.rint(lv[:, :1] * Mt[bi, 0] + lv[:, 1:] * Mt[bi, 1] + off[bi]).astype(np.int32)
        batches = parts.batches
        if parts.wheels:
            cv2.fillPoly(canvas, [pts[a:b] for a, b in batches[0][0]], batches[0][1], cv2.LINE_8, _FIXED_BITS)
            batches = batches[1:]
            w, r = car_dynamics.WHEEL_W * car_dynamics.SIZE, car_dynamics.WHEEL_R * car_dynamics.SIZE
            stripes = []
            for i in parts.wheels:
                phase = bodies[i].phase
                a1, a2 = phase, phase + 1.2  # radians
                s1, s2 = math.sin(a1), math.sin(a2)
                if s1 > 0 and s2 > 0:
                    continue
                c1, c2 = math.cos(a1), math.cos(a2)
                if s1 > 0:
                    c1 = math.copysign(1.0, c1) if c1 else 0.0
                if s2 > 0:
                    c2 = math.copysign(1.0, c2) if c2 else 0.0
                stripe = np.array([(-w, r * c1), (w, r * c1), (w, r * c2), (-w, r * c2)]) @ Mt[i] + off[i]
                stripes.append(np.rint(stripe).astype(np.int32))
            if stripes:
                cv2.fillPoly(canvas, stripes, car_dynamics.WHEEL_WHITE, cv2.LINE_8, _FIXED_BITS)
        for spans, color in batches:
            cv2.fillPoly(canvas, [pts[a:b] for a, b in spans], color, cv2.LINE_8, _FIXED_BITS)

    # ------------------------------------------------------------------ the HUD
    def _draw_hud(self, out: np.ndarray, fx: float, fy: float) -> np.ndarray:
        """Gymnasium's `_render_indicators` plus the score text, drawn over the bottom rows of `out`.

        The bars are axis-aligned rectangles: they are filled on a 4x supersampled strip of only the HUD
        rows and box-filtered down; the text patch is box-filtered exactly (cached per label).
        """
        W, H = WINDOW_W, WINDOW_H
        out_h, out_w = out.shape[:2]
        r0 = int(math.floor(SCENE_H * fy))
        if r0 >= out_h:
            return out
        kk = _HUD_SUPERSAMPLE
        strip = np.zeros(((out_h - r0) * kk, out_w * kk, 3), np.uint8)
        sh, sw = strip.shape[:2]
        cx, cy = fx * kk, fy * kk
        oy = r0 * kk

        def paint(x0: float, x1: float, y0: float, y1: float, color: tuple[int, int, int]) -> None:
            # pygame.draw.polygon fills whole window pixels, both end pixels included
            xa, xb = math.floor(min(x0, x1)), math.floor(max(x0, x1)) + 1
            ya, yb = math.floor(min(y0, y1)), math.floor(max(y0, y1)) + 1
            ca, cb = max(round(xa * cx), 0), min(round(xb * cx), sw)
            ra, rb = max(round(ya * cy) - oy, 0), min(round(yb * cy) - oy, sh)
            if ca < cb and ra < rb:
                cv2.rectangle(strip, (ca, ra), (cb - 1, rb - 1), color, -1)

        s, h = W / 40.0, H / 40.0
        car = self.car
        assert car is not None
        v = car.hull.linearVelocity
        true_speed = math.sqrt(v[0] * v[0] + v[1] * v[1])
        wheels = car.wheels
        ja = wheels[0].joint.angle
        av = car.hull.angularVelocity
        # (value gating the draw, place, bar value, colour): speed, 4 ABS sensors; then steering and gyro
        for value, place, val, color in (
            (true_speed, 5, 0.02 * true_speed, (255, 255, 255)),
            (wheels[0].omega, 7, 0.01 * wheels[0].omega, (0, 0, 255)),
            (wheels[1].omega, 8, 0.01 * wheels[1].omega, (0, 0, 255)),
            (wheels[2].omega, 9, 0.01 * wheels[2].omega, (51, 0, 255)),
            (wheels[3].omega, 10, 0.01 * wheels[3].omega, (51, 0, 255)),
        ):
            if abs(value) > 1e-4:
                paint(place * s, (place + 1) * s, H - (h + h * val), H - h, color)
        for value, place, val, color in ((ja, 20, -10.0 * ja, (0, 255, 0)), (av, 30, -0.8 * av, (255, 0, 0))):
            if abs(value) > 1e-4:
                paint(place * s, (place + val) * s, H - 4 * h, H - 2 * h, color)

        hud = _downsample(strip, kk)
        # the black bar starts at window row 700; an output row shared with the scene is blended
        black = (r0 + 1) - SCENE_H * fy
        if black < 1.0:
            top = out[r0].astype(np.float32) * (1.0 - black) + hud[0]
            hud[0] = np.clip(top + 0.5, 0, 255).astype(np.uint8)
        out[r0:] = hud

        text, box, rows, cols = self._text_patch(f"{self.reward:04.0f}", out_h, out_w, fx, fy)
        if rows.start >= math.ceil(SCENE_H * fy) and cols.stop <= math.floor(5 * s * fx):
            # the text sits on pure black (left of the speed bar, below the scene): paste it
            out[rows, cols] = (text + 0.5).astype(np.uint8)
        else:
            region = out[rows, cols].astype(np.float32)
            out[rows, cols] = (region * (1.0 - box) + text + 0.5).astype(np.uint8)
        return out

    def _text_patch(self, label: str, out_h: int, out_w: int, fx: float,
                    fy: float) -> tuple[np.ndarray, np.ndarray, slice, slice]:
        """The score text (white, pygame's default font at 42 px) box-filtered to the output grid, cached."""
        key = (label, out_h, out_w)
        hit = self._text_cache.get(key)
        if hit is not None:
            self._text_cache.move_to_end(key)
            return hit
        import pygame

        if self._font is None:
            pygame.font.init()
            self._font = pygame.font.Font(pygame.font.get_default_font(), 42)
        surf = self._font.render(label, True, (255, 255, 255), (0, 0, 0))
        rect = surf.get_rect()
        rect.center = (60, WINDOW_H - WINDOW_H * 2.5 / 40.0)
        glyph = pygame.surfarray.array3d(surf)[..., 0].T.astype(np.float64)  # (h, w) white level
        x0, y0 = rect.x, rect.y
        xa, xb, ya, yb = max(x0, 0), min(x0 + rect.w, WINDOW_W), max(y0, 0), min(y0 + rect.h, WINDOW_H)
        glyph = glyph[ya - y0:yb - y0, xa - x0:xb - x0]
        Ax = _area_matrix(out_w, WINDOW_W, fx)[:, xa:xb]
        Ay = _area_matrix(out_h, WINDOW_H, fy)[:, ya:yb]
        rows_nz = np.flatnonzero(Ay.sum(1) > 0)
        cols_nz = np.flatnonzero(Ax.sum(1) > 0)
        rows = slice(int(rows_nz[0]), int(rows_nz[-1]) + 1)
        cols = slice(int(cols_nz[0]), int(cols_nz[-1]) + 1)
        Ay, Ax = Ay[rows], Ax[cols]
        text = (Ay @ glyph @ Ax.T).astype(np.float32)[..., None]
        box = np.outer(Ay.sum(1), Ax.sum(1)).astype(np.float32)[..., None]
        hit = (text, box, rows, cols)
        self._text_cache[key] = hit
        if len(self._text_cache) > 512:
            self._text_cache.popitem(last=False)
        return hit


def _downsample(canvas: np.ndarray, k: int) -> np.ndarray:
    """Box-filter a canvas by an integer factor k (exact k x k means)."""
    if k == 1:
        return canvas
    h, w = canvas.shape[0] // k, canvas.shape[1] // k
    if k & (k - 1) == 0:
        # an exact 2x bilinear shrink samples between two pixels: the 2x2 mean; repeat for 4, 8, 16
        while k > 1:
            canvas = cv2.resize(canvas, (canvas.shape[1] // 2, canvas.shape[0] // 2), interpolation=cv2.INTER_LINEAR)
            k //= 2
        return canvas
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)


@functools.cache
def _smoothscale_bias(width: int, height: int) -> int:
    """How many levels pygame's smoothscale of the 1000x800 window to (width, height) loses (2 at 96x96).

    Its fixed-point box filter truncates; gymnasium's observations are therefore 2 levels darker than the
    colours drawn, which the fast renderer reproduces by subtracting this (measured once, with pygame).
    """
    import pygame

    surf = pygame.Surface((WINDOW_W, WINDOW_H))
    surf.fill((128, 128, 128))
    small = pygame.transform.smoothscale(surf, (width, height))
    return int(128 - int(np.median(pygame.surfarray.array3d(small))))


def _darken(img: np.ndarray, levels: int) -> np.ndarray:
    return cv2.subtract(img, (levels, levels, levels, 0)) if levels > 0 else img


def _color(c: Any) -> tuple[int, int, int]:
    return (int(c[0]), int(c[1]), int(c[2]))
