"""MONAI Label app serving the pathology_wsss bundle: segmentation of tiles and of slide regions (QuPath, Digital
Slide Archive) and training on a pathologist's corrections.

    monailabel start_server --app apps/monailabel --studies <folder of tiles or slides> [--conf bundle <bundle dir>]

The bundle defaults to the repository's ``bundle/``; its ``models/model.pt`` is what is served and what training
replaces. Bad input (an unknown image id, an unreadable slide, a region outside the slide) is an HTTP error whose
detail names the file and the problem.
"""

from __future__ import annotations

import os

import monailabel
from fastapi import HTTPException
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from wsss_tasks import Segmentation, Training, on_path

MODEL = "pathology_wsss"
DEFAULT_BUNDLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bundle")


class PathologyWSSSApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundle = os.path.realpath(conf.get("bundle") or DEFAULT_BUNDLE)
        with on_path(self.bundle):
            import scripts.errors
            import scripts.viewer
            import scripts.wsi.reader

        # kept: MONAI Label unloads scripts.* between requests
        self.errors, self.viewer, self.reader = scripts.errors, scripts.viewer, scripts.wsi.reader
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="pathology_wsss",
            description="Weakly-supervised tissue segmentation of H&E (MONAI bundle pathology_wsss)",
            version=monailabel.__version__,
        )

    def init_infers(self):
        task = Segmentation(self.bundle, self.conf)
        return {MODEL: task} if task.is_valid() else {}

    def init_trainers(self):
        task = Training(self.bundle, self.conf)
        return {MODEL: task} if task.is_valid() else {}

    def init_strategies(self):
        return {"random": Random(), "first": First()}

    def infer(self, request, datastore=None):
        self._image_path(request)
        return self._http_errors(super().infer, request, datastore)

    def infer_wsi(self, request, datastore=None):
        path = self._image_path(request)
        if path and not path.lower().endswith(self.viewer.TILE_SUFFIXES):
            # MONAI Label opens the slide itself to tile the region: a bad file fails there, without a message
            self._http_errors(self.reader.open_slide, path)
        return self._http_errors(super().infer_wsi, request, datastore)

    def _image_path(self, request) -> str | None:
        """The local file a request names (a path, or a datastore image id); 404 for an unknown id."""
        image = request.get("image")
        if not isinstance(image, str):
            return None
        path = image if os.path.exists(image) else self.datastore().get_image_uri(image)
        if not path:
            raise HTTPException(status_code=404, detail=f"image {image!r}: no such image in the datastore")
        return path

    def _http_errors(self, call, *args):
        """The bundle's one-line message for bad input, as an HTTP error instead of a 500 and a traceback."""
        try:
            return call(*args)
        except Exception as e:
            message = self.errors.user_error(e)
            if message is None:
                raise
            raise HTTPException(status_code=422, detail=message) from e
