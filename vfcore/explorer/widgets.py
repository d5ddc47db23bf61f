"""The explorer's widgets (ipywidgets 8): a view over :class:`~.state.ExplorerState`.

Each control calls one action of the state and puts what it returns on screen: the sample's
slice as a PNG in a ``widgets.Image`` (96 voxels x :data:`~.data.SCALE` = 480 px; a slider
step re-encodes one PNG in a few ms, ``bench/bench_explorer.py`` measures it), beside it one
exemplar of the same unit (``vf-exemplar-image``), orientation letters around both and the
overlay's colour scale; below, the unit's exemplar row (matplotlib, in an ``Output``). Every
widget carries a CSS class (``vf-...``, :data:`CSS_CLASSES`) so tests can find it. Errors
(bad upload, missing, stale or damaged artifacts) go to the status line (``vf-status``); the
kernel never sees them. Displayed, the explorer also carries a PNG of its view
(``image/png``), which notebook viewers without widgets (GitHub, nbviewer) show instead.
"""
from __future__ import annotations

import base64
import functools
import html
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from vfcore.constants import DISPLAY_WINDOW_HU, PATCH_SIZE
from vfcore.dissect import VIEWS
from vfcore.errors import InputError, VfcoreError
from vfcore.viz.units import ORIENTATION, figure_png, png_bytes

import vfcore.explorer.text as text
from .data import SCALE, TOP_UNITS, Analysis, RunData
from .figures import _unit_panel, snapshot_figure, static_figure
from .state import MODES, ExplorerState, Redraw
from .text import OUTCOMES
from .upload import UPLOAD_SUFFIXES

#: CSS classes of the explorer's widgets (stable names for tests and custom styling).
CSS_CLASSES = {
    "root": "vf-explorer",
    "status": "vf-status",
    "filter": "vf-filter",
    "sample": "vf-sample-select",
    "upload": "vf-upload",
    "prediction": "vf-prediction",
    "units": "vf-unit-select",
    "view": "vf-view-axis",
    "mode": "vf-mode",
    "slider": "vf-slice-slider",
    "image": "vf-image",
    "readout": "vf-readout",
    "scale": "vf-colour-scale",
    "exemplar_image": "vf-exemplar-image",
    "exemplar_select": "vf-exemplar-select",
    "exemplar_readout": "vf-exemplar-readout",
    "unit_info": "vf-unit-info",
    "exemplars": "vf-exemplars",
    "exemplar_header": "vf-exemplar-header",
    "concept_label": "vf-concept-label",
    "concept_note": "vf-concept-note",
    "concept_save": "vf-concept-save",
    "concepts": "vf-concept-table",
}


def _guarded(method):
    """Run an action; any error becomes a status message (the kernel never sees it, and the
    view stays as it was)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except VfcoreError as exc:
            self._set_status(str(exc), "error")
        except Exception as exc:  # noqa: BLE001 - a widget must survive anything
            self._set_status(f"unexpected {type(exc).__name__}: {exc} (the explorer keeps its last view)",
                             "error")
        return None

    return wrapper


def _strip_tags(text: str) -> str:
    return re.sub(r"<[^>]+>", "", text)


def _letter(text: str = "", width: str = "16px") -> "object":
    import ipywidgets as w   # optional (notebooks only): the state and tests run without it

    return w.HTML(text, layout=w.Layout(width=width, justify_content="center", align_items="center"))


class Explorer:
    """The concept explorer. Build it with :func:`explore`; display it as the last expression
    of a cell. The methods below do what the controls do (tests and notebooks use them); they
    never raise: problems are shown in the status line (``status_text``)."""

    def __init__(self, data: RunData | None, problem: str | None = None, top: int = TOP_UNITS):
        import ipywidgets as w   # optional (notebooks only): the state and tests run without it

        self.state = ExplorerState(data, top) if data is not None else None
        self.top_n = top
        self._hold = False  # set while the code (not the student) changes widget values
        self.last_redraw_ms = float("nan")
        self.exemplar_captions: list[str] = []  # what the exemplar row shows (for tests)

        c = CSS_CLASSES
        side = PATCH_SIZE * SCALE
        self.status = w.HTML().add_class(c["status"])
        self.filter = w.ToggleButtons(options=[("all", "all")], value="all",
                                      style={"button_width": "auto"}).add_class(c["filter"])
        self.sample_select = w.Dropdown(options=[], value=None, description="sample",
                                        layout=w.Layout(width="520px")).add_class(c["sample"])
        self.upload = w.FileUpload(accept=",".join(UPLOAD_SUFFIXES), multiple=False,
                                   description="upload patch").add_class(c["upload"])
        self.prediction = w.HTML().add_class(c["prediction"])
        self.unit_select = w.Select(options=[], rows=top, description="units",
                                    layout=w.Layout(width="480px")).add_class(c["units"])
        self.keep_slice = w.Checkbox(value=False, description="keep slice when changing unit",
                                     indent=False).add_class("vf-keep-slice")
        self.view_select = w.ToggleButtons(options=list(VIEWS), value="sagittal",
                                           style={"button_width": "80px"}).add_class(c["view"])
        self.mode_select = w.ToggleButtons(options=list(MODES), value="overlay",
                                           style={"button_width": "80px"}).add_class(c["mode"])
        self.slider = w.IntSlider(value=PATCH_SIZE // 2, min=0, max=PATCH_SIZE - 1,
                                  description="slice", continuous_update=True,
                                  layout=w.Layout(width=f"{side}px")).add_class(c["slider"])
        self.image = w.Image(format="png", width=side, height=side,
                             layout=w.Layout(width=f"{side}px", height=f"{side}px",
                                             min_width=f"{side}px")).add_class(c["image"])
        self.readout = w.HTML(layout=w.Layout(width=f"{side}px")).add_class(c["readout"])
        self.colour_scale = w.HTML(layout=w.Layout(width=f"{side}px")).add_class(c["scale"])
        self.exemplar_select = w.Dropdown(options=[], value=None, description="exemplar",
                                          layout=w.Layout(width=f"{side}px")).add_class(c["exemplar_select"])
        self.exemplar_image = w.Image(format="png", width=side, height=side,
                                      layout=w.Layout(width=f"{side}px", height=f"{side}px",
                                                      min_width=f"{side}px")).add_class(c["exemplar_image"])
        self.exemplar_readout = w.HTML(layout=w.Layout(width=f"{side}px")).add_class(c["exemplar_readout"])
        self.unit_info = w.HTML().add_class(c["unit_info"])
        self.exemplars = w.Output().add_class(c["exemplars"])
        self.exemplar_header = w.HTML().add_class(c["exemplar_header"])
        self.concept_label = w.Text(description="concept", placeholder="e.g. anterior wedge",
                                    continuous_update=True).add_class(c["concept_label"])
        self.concept_note = w.Textarea(description="note", placeholder="what the unit looks at",
                                       layout=w.Layout(height="60px")).add_class(c["concept_note"])
        self.concept_save = w.Button(description="save concepts", icon="save").add_class(c["concept_save"])
        self.concept_table = w.HTML().add_class(c["concepts"])

        self._letters: list[tuple] = []  # (top, bottom, left, right) HTML widgets per picture

        def lettered(img):
            top, bottom, left, right = (_letter() for _ in range(4))
            for lab in (top, bottom):
                lab.layout.width = f"{side + 32}px"
            self._letters.append((top, bottom, left, right))
            return w.VBox([top, w.HBox([left, img, right], layout=w.Layout(align_items="center")), bottom])

        legend = w.HTML("<small>Overlay: the mask M_k = A_k &gt; T_k of the selected unit, coloured by its "
                        "upsampled activation from red (lowest) to yellow (highest); contour: its "
                        "outline in cyan. Grey: CT, window "
                        f"[{DISPLAY_WINDOW_HU[0]:.0f}, {DISPLAY_WINDOW_HU[1]:.0f}] HU. Letters: "
                        "S/I superior/inferior, A/P anterior/posterior, R/L the patient's right/left."
                        "</small>")
        sample_panel = w.VBox([w.HTML("<b>This vertebra</b>"), self.slider, lettered(self.image),
                               self.readout, self.colour_scale])
        exemplar_panel = w.VBox([w.HTML("<b>An exemplar of the same unit</b> (its general concept)"),
                                 self.exemplar_select, lettered(self.exemplar_image), self.exemplar_readout])
        concept = w.VBox([self.unit_info, w.HTML("<b>Concept of the selected unit</b>"),
                          self.concept_label, self.concept_note, self.concept_save, self.concept_table])
        self.ui = w.VBox([
            w.HTML("<h3 style='margin:0'>Concept explorer</h3>"),
            self.status,
            w.HBox([self.filter]),
            w.HBox([self.sample_select, self.upload]),
            self.prediction,
            w.HBox([w.VBox([self.unit_select, self.keep_slice]), concept]),
            w.HBox([self.view_select, self.mode_select]),
            w.HBox([sample_panel, exemplar_panel], layout=w.Layout(flex_flow="row wrap")),
            legend,
            w.HTML("<b>Exemplars of the selected unit</b> (its top-activating samples, as notebook 04 "
                   "exported them: its general concept)"),
            self.exemplar_header,
            self.exemplars,
        ]).add_class(c["root"])

        self.filter.observe(self._on_filter, "value")
        self.sample_select.observe(self._on_sample, "value")
        self.upload.observe(self._on_upload, "value")
        self.unit_select.observe(self._on_unit, "value")
        self.view_select.observe(self._on_view, "value")
        self.mode_select.observe(self._on_mode, "value")
        self.slider.observe(self._on_slider, "value")
        self.keep_slice.observe(self._on_keep_slice, "value")
        self.exemplar_select.observe(self._on_exemplar, "value")
        self.concept_label.observe(self._on_concept_edit, "value")
        self.concept_note.observe(self._on_concept_edit, "value")
        self.concept_save.on_click(lambda _b: self.save_concepts())
        self._show_letters("sagittal")

        if data is None:
            self._set_enabled(False)
            self._set_status(problem or "no run data", "error")
            return
        self._fill_filter()
        self._fill_samples()
        self._show_concept_table()
        if data.concepts.problem:
            self._set_status(data.concepts.problem, "warning")
        elif data.meta.get("c_k_problem"):
            self._set_status(f"c_k ranks are undefined ({data.meta['c_k_problem']}); "
                             "units are listed by r_k only", "warning")

    # ---- the state, read through ------------------------------------------------------------
    data = property(lambda self: None if self.state is None else self.state.data)
    analysis = property(lambda self: None if self.state is None else self.state.analysis)
    sample_index = property(lambda self: None if self.state is None else self.state.sample_index)
    unit = property(lambda self: None if self.state is None else self.state.unit)
    view = property(lambda self: "sagittal" if self.state is None else self.state.view)
    index = property(lambda self: PATCH_SIZE // 2 if self.state is None else self.state.index)
    mode = property(lambda self: "overlay" if self.state is None else self.state.mode)

    # ---- display --------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs):
        """The widget, and a PNG of its view for viewers without widgets (GitHub, nbviewer)."""
        bundle = self.ui._repr_mimebundle_(**kwargs)
        png = self.snapshot_png()
        if png:
            bundle["image/png"] = base64.b64encode(png).decode("ascii")
        return bundle

    def snapshot_png(self) -> bytes | None:
        """The explorer's two pictures as one PNG (:func:`~.figures.snapshot_figure`), or None."""
        if self.analysis is None or self.unit is None:
            return None
        import matplotlib.pyplot as plt   # heavy: only for a picture

        fig = snapshot_figure(self.state, self.prediction_text)
        try:
            return figure_png(fig)
        finally:
            plt.close(fig)

    def snapshot(self):
        """The explorer's view as an image for the notebook (``IPython.display.Image``)."""
        from IPython.display import Image   # optional: only inside a notebook

        png = self.snapshot_png()
        if png is None:
            print(self.status_text)
            return None
        return Image(data=png, format="png")

    # ---- what is on screen, as text -----------------------------------------------------------
    @property
    def status_text(self) -> str:
        return html.unescape(_strip_tags(self.status.value))

    @property
    def readout_text(self) -> str:
        return html.unescape(_strip_tags(self.readout.value))

    @property
    def prediction_text(self) -> str:
        """The prediction and draft-finding lines as plain text, one line each."""
        return html.unescape(_strip_tags(self.prediction.value.replace("<br>", "\n")))

    def expected_rgb(self, unit: int | None = None, view: str | None = None, index: int | None = None,
                     mode: str | None = None) -> np.ndarray:
        """What the image shows for (unit, view, slice, mode): the current ones by default."""
        return self.state.image(unit, view, index, mode)

    # ---- actions (what the controls do) ------------------------------------------------------
    @_guarded
    def select_sample(self, key: int | str) -> None:
        """Show a sample of the list (table index or ``"<case> <level>"``)."""
        self._apply(self._require_state().select_sample(key))

    @_guarded
    def load_upload(self, name: str, content: bytes) -> None:
        """Show an uploaded patch (``.nii``, ``.nii.gz``, ``.npy``; see :func:`read_upload`)."""
        self._apply(self._require_state().load_upload(name, content))

    @_guarded
    def select_unit(self, unit: int) -> None:
        """Show one of the listed units (by unit number)."""
        self._apply(self._require_state().select_unit(unit))

    @_guarded
    def set_view(self, view: str | None = None, index: int | None = None, mode: str | None = None) -> None:
        """Change the view axis, the slice and/or the overlay mode."""
        self._apply(self._require_state().set_view(view, index, mode))

    @_guarded
    def select_exemplar(self, position: int) -> None:
        """Show another exemplar of the unit beside the sample (0 = the strongest)."""
        self._apply(self._require_state().select_exemplar(position))

    @_guarded
    def save_concepts(self) -> Path | None:
        """Write the concept dictionary to the run folder (atomically)."""
        book = self._require_state().data.concepts
        try:
            path = book.save()
        except OSError as exc:
            raise InputError(book.path, f"could not be written ({exc.strerror or exc}); your "
                                        f"{len(book.units)} label(s) are kept here, save again later") from None
        self._refresh_unit_options()
        self._show_concept_table()
        if self.unit is not None:
            self._show_exemplar_header()
        self._set_status(f"Saved {len(book.units)} concept label(s) to {path}.", "ok")
        return path

    def static_figure(self, sample: int | str | None = None, n_units: int = 5, view: str | None = None,
                      unit: int | None = None):
        """A matplotlib figure (:func:`~.figures.static_figure`): the sample and its
        ``n_units`` most relevant units, and the exemplars of ``unit``.

        ``sample=None`` draws what the explorer shows; a sample (row number or
        ``"<case> <level>"``) is drawn without changing the live view. Returns the figure, or
        None (with the reason printed) when there is nothing to draw.
        """
        a = self._analysis_for(sample)
        if a is None:
            print(self.status_text)
            return None
        return static_figure(self.state, a, n_units=n_units, view=view, unit=unit)

    def unit_table(self, sample: int | str | None = None) -> pd.DataFrame:
        """The top units of the shown sample (or of ``sample``, without changing the view) as a
        table (see :meth:`RunData.unit_table`)."""
        a = self._analysis_for(sample)
        return pd.DataFrame() if a is None else self.data.unit_table(a)

    def pick(self, outcome: str = "TP") -> int | None:
        """The most confident sample of an outcome (TP, FP, TN, FN), or None (none in the
        split, or no run data: the status line says why)."""
        return None if self.data is None else self.data.pick(outcome)

    @_guarded
    def _analysis_for(self, sample: int | str | None) -> Analysis | None:
        return None if self.state is None else self.state.analysis_for(sample)

    # ---- callbacks ------------------------------------------------------------------------
    @_guarded
    def _on_filter(self, change) -> None:
        if not self._hold:
            self._fill_samples()

    def _on_sample(self, change) -> None:
        if not self._hold and change["new"] is not None and change["new"] != self.sample_index:
            self.select_sample(int(change["new"]))

    @_guarded
    def _on_upload(self, change) -> None:
        if self._hold or not change["new"]:
            return
        item = change["new"][0]
        try:
            self.load_upload(item["name"], item["content"])
        finally:
            self._hold_set(self.upload, "value", ())  # the same file can be uploaded again

    def _on_unit(self, change) -> None:
        if not self._hold and change["new"] is not None and change["new"] != self.unit:
            self.select_unit(int(change["new"]))

    def _on_view(self, change) -> None:
        if not self._hold:
            self.set_view(view=change["new"])

    def _on_mode(self, change) -> None:
        if not self._hold:
            self.set_view(mode=change["new"])

    def _on_slider(self, change) -> None:
        if not self._hold:
            self.set_view(index=int(change["new"]))

    def _on_keep_slice(self, change) -> None:
        if self.state is not None:
            self.state.keep_slice = bool(change["new"])

    def _on_exemplar(self, change) -> None:
        if not self._hold and change["new"] is not None:
            self.select_exemplar(int(change["new"]))

    @_guarded
    def _on_concept_edit(self, change) -> None:
        if self._hold or self.unit is None:
            return
        self.data.concepts.set(self.unit, label=self.concept_label.value, note=self.concept_note.value)
        if self.data.concepts.dirty:
            self._set_status(f"Concept of unit {self.unit} edited (not saved yet: press 'save concepts').",
                             "warning")

    # ---- putting the state on screen ----------------------------------------------------------
    def _apply(self, redraw: Redraw) -> None:
        """Bring the widgets in line with the state after an action."""
        s = self.state
        self._hold_set(self.view_select, "value", s.view)
        self._hold_set(self.mode_select, "value", s.mode)
        self._hold_set(self.slider, "max", s.n_slices - 1)
        self._hold_set(self.slider, "value", s.index)
        if redraw.sample:
            values = {v for _, v in self.sample_select.options}
            self._hold_set(self.sample_select, "value", s.sample_index if s.sample_index in values else None)
            self._show_prediction()
            self._refresh_unit_options()
        if redraw.unit:
            self._hold_set(self.unit_select, "value", s.unit)
            self._show_concept_editor()
            self._show_unit_info()
        self._show_letters(s.view)
        if redraw.image:
            self._redraw()
        if redraw.partner:
            self._draw_partner()
        if redraw.exemplars:
            self._draw_exemplars()

    def _require_state(self) -> ExplorerState:
        if self.state is None:
            raise InputError(None, "the explorer has no run data (see the message above)")
        return self.state

    def _hold_set(self, widget, name: str, value) -> None:
        if getattr(widget, name) == value:
            return
        self._hold = True
        try:
            setattr(widget, name, value)
        finally:
            self._hold = False

    def _set_status(self, text: str, level: str = "ok") -> None:
        colour = {"ok": "#1b5e20", "warning": "#8a5a00", "error": "#b71c1c"}[level]
        self.status.value = f"<span style='color:{colour}' data-level='{level}'>{html.escape(text)}</span>"

    def _set_enabled(self, enabled: bool) -> None:
        for wdg in (self.filter, self.sample_select, self.upload, self.unit_select, self.view_select,
                    self.mode_select, self.slider, self.concept_label, self.concept_note,
                    self.concept_save, self.keep_slice, self.exemplar_select):
            wdg.disabled = not enabled

    def _show_letters(self, view: str) -> None:
        top, bottom, left, right = ORIENTATION[view]
        for widgets in self._letters:
            for wdg, letter in zip(widgets, (top, bottom, left, right)):
                wdg.value = f"<div style='text-align:center'><b style='color:#1565c0'>{letter}</b></div>"

    def _fill_filter(self) -> None:
        t = self.data.samples.table
        counts = t["outcome"].value_counts()
        options = [(f"all ({len(t)})", "all")] + [(f"{o} ({int(counts.get(o, 0))})", o) for o in OUTCOMES]
        self._hold_set(self.filter, "options", options)
        self._hold_set(self.filter, "value", "all")

    def _fill_samples(self) -> None:
        t = self.data.samples.table
        if self.filter.value != "all":
            t = t[t["outcome"] == self.filter.value]
        options = [(text.sample_label(row), int(i)) for i, row in t.iterrows()]
        keep = self.sample_index if self.sample_index in {v for _, v in options} else None
        self._hold = True
        try:
            self.sample_select.options = options
            self.sample_select.value = keep
        finally:
            self._hold = False

    def _show_prediction(self) -> None:
        self.prediction.value = text.prediction_html(self.analysis) + "<br>" + text.findings_html(self.data, self.analysis)

    def _unit_label(self, position: int, unit: int) -> str:
        return text.unit_label(self.data, self.analysis, position, unit)

    def _refresh_unit_options(self) -> None:
        if self.analysis is None:
            return
        options = [(self._unit_label(i, k), k) for i, k in enumerate(self.analysis.top, start=1)]
        self._hold = True
        try:
            self.unit_select.options = options
            self.unit_select.value = self.unit
        finally:
            self._hold = False

    def _show_unit_info(self) -> None:
        self.unit_info.value = text.unit_info_html(self.data, self.analysis, self.unit)

    def _show_concept_editor(self) -> None:
        entry = self.data.concepts.get(self.unit)
        self._hold_set(self.concept_label, "value", entry["label"])
        self._hold_set(self.concept_note, "value", entry["note"])
        self.concept_label.description = f"unit {self.unit}"

    def _show_concept_table(self) -> None:
        self.concept_table.value = text.concept_table_html(self.data.concepts.units)

    def _redraw(self) -> None:
        start = time.perf_counter()
        s = self.state
        self.image.value = png_bytes(s.image())
        self.readout.value = html.escape(s.readout()).replace(f"unit {s.unit} (", f"<b>unit {s.unit}</b> (", 1)
        umap = s.umap
        if s.mode == "overlay" and umap.mask.any():
            self.colour_scale.value = (
                "<div style='display:flex;align-items:center;gap:6px;font-size:11px'>"
                f"<span>A_k {umap.low:.3g}</span><div style='flex:1;height:10px;"
                "background:linear-gradient(to right,#ff0000,#ffff00)'></div>"
                f"<span>{umap.high:.3g}</span></div>")
        else:
            self.colour_scale.value = ""
        self._set_status(f"Showing {s.analysis.name}: unit {s.unit}, {s.view} slice {s.index}.", "ok")
        self.last_redraw_ms = 1000 * (time.perf_counter() - start)

    def _draw_partner(self) -> None:
        """The selected exemplar beside the sample, and the exemplar list to choose from."""
        s = self.state
        ex = s.exemplars()
        options = [(f"{j + 1}. " + s.exemplar_caption(j).replace("\n", ", "), j) for j in range(len(ex))]
        self._hold = True
        try:
            self.exemplar_select.options = options
            self.exemplar_select.value = min(s.exemplar, len(ex) - 1) if ex else None
        finally:
            self._hold = False
        rgb = s.exemplar_image()
        if rgb is None:
            self.exemplar_image.value = png_bytes(np.full((PATCH_SIZE * SCALE,) * 2 + (3,), 240, np.uint8))
            self.exemplar_readout.value = f"unit {s.unit}: no exemplars"
        else:
            self.exemplar_image.value = png_bytes(rgb)
            pos = min(s.exemplar, len(ex) - 1)
            self.exemplar_readout.value = html.escape(
                f"exemplar {pos + 1} of {len(ex)} of unit {s.unit}: "
                + s.exemplar_caption(pos).replace("\n", ", ") + " (its best slice)")

    def _draw_exemplars(self) -> None:
        s = self.state
        ex = s.exemplars()
        slices = s.exemplar_slices()
        self.exemplar_captions = [s.exemplar_caption(j, sl) for j, sl in enumerate(slices)]
        with self.exemplars:
            if ex:
                self.exemplars.clear_output(wait=True)
                self._exemplar_figure(ex, slices)
            else:
                self.exemplars.clear_output()
        # set after the figure went out, so "unit k" here means the row shows unit k
        self._show_exemplar_header(len(ex))

    def _show_exemplar_header(self, n: int | None = None) -> None:
        n = len(self.exemplar_captions) if n is None else n
        self.exemplar_header.value = html.escape(text.exemplar_header(self.data, self.unit, n))

    def _exemplar_figure(self, ex, slices) -> None:
        import matplotlib.pyplot as plt   # heavy: only for a picture

        view = self.view
        fig, axes = plt.subplots(1, len(ex), figsize=(2.4 * len(ex), 2.8), squeeze=False)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.82, wspace=0.06)
        for ax, (i, patch, umap), s, caption in zip(axes[0], ex, slices, self.exemplar_captions):
            _unit_panel(ax, patch, umap, view, s, "overlay", caption)
        plt.show()
        plt.close(fig)


def explore(run_dir: str | Path, sample: int | str | None = None, top: int = TOP_UNITS,
            split: str | None = None, device: str | None = None) -> Explorer:
    """Open the concept explorer on a run folder (notebook 05).

    ``sample``: a row of the sample list (index, or ``"<case> <level>"``); None shows the most
    confident true positive; ``split`` None: the run's dissection set (notebook 03's default).
    A run folder without, with stale or with damaged dissection
    artifacts gives an explorer whose status line says which file and which notebook to run;
    it never raises.
    """
    try:
        data = RunData.from_run(run_dir, split=split, device=device)
    except VfcoreError as exc:
        return Explorer(None, problem=str(exc), top=top)
    except Exception as exc:  # noqa: BLE001 - the promise: never raise, say why
        return Explorer(None, problem=f"{run_dir}: the run folder could not be read "
                                      f"({type(exc).__name__}: {exc})", top=top)
    app = Explorer(data, top=top)
    if sample is None:
        sample = data.pick("TP")
        if sample is None:
            sample = int(data.samples.table["probability"].idxmax())
    app.select_sample(sample)
    return app
