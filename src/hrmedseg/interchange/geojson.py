"""QuPath GeoJSON: one Feature per object, outlines in image pixels, the class as QuPath's classification.

A FeatureCollection as QuPath's "Export objects as GeoJSON" writes it and "Import objects" reads
it: each Feature has a Polygon (holes kept) or, for an object in several pieces, a MultiPolygon;
``properties`` hold ``objectType: "annotation"``, ``classification: {name, color: [r, g, b]}``
for classified objects, and hrmedseg's own fields ``object_id``, ``score``, ``model`` and
``edited`` (QuPath keeps properties it does not know). Coordinates follow polygons.py: x right,
y down, pixel (r, c) is the square [c, c + 1) x [r, r + 1).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Sequence

import shapely.geometry

from ..atomic import atomic_path
from ..errors import InputError
from ..store import ImageAnnotation, ObjectClass
from .objects import ImportedObject, object_masks, provenance
from .polygons import mask_to_geometry, rasterize


def to_feature_collection(annotation: ImageAnnotation, classes: Sequence[ObjectClass]) -> dict[str, Any]:
    """The annotation of one image as a GeoJSON FeatureCollection (a dict ready for ``json.dump``)."""
    colors = {c.name: list(c.color) for c in classes}
    features = []
    for obj in object_masks(annotation):
        record = obj.record
        properties: dict[str, Any] = {
            "objectType": "annotation",
            "name": f"object {record.id}",
            **provenance(record),
        }
        if record.class_name is not None:
            properties["classification"] = {"name": record.class_name, "color": colors[record.class_name]}
        features.append({
            "type": "Feature",
            # QuPath identifies objects by UUID; a name-based one keeps it stable across exports.
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"hrmedseg:{annotation.image_key}:{record.id}")),
            "geometry": shapely.geometry.mapping(mask_to_geometry(obj.mask, obj.offset_yx)),
            "properties": properties,
        })
    return {"type": "FeatureCollection", "features": features}


def write_geojson(path: Path, annotation: ImageAnnotation, classes: Sequence[ObjectClass]) -> None:
    """Write ``to_feature_collection`` to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(to_feature_collection(annotation, classes), f)


def _features(data: Any, source: str) -> list[dict[str, Any]]:
    """Features of a FeatureCollection, a single Feature, or a bare list of Features (QuPath writes all three)."""
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list):
        raise InputError(f"{source} is not GeoJSON: no FeatureCollection, Feature or list of Features")
    return data


def read_features(
    data: Any, shape_yx: tuple[int, int], source: str
) -> tuple[list[ImportedObject], dict[str, tuple[int, int, int] | None]]:
    """Objects from parsed GeoJSON, rasterised on a (H, W) image; and the classes they name (name -> colour).

    Polygon and MultiPolygon features become objects; QuPath's annotations and detections both.
    Other geometries (points, lines) have no area: InputError naming the feature.
    """
    objects: list[ImportedObject] = []
    classes: dict[str, tuple[int, int, int] | None] = {}
    for index, feature in enumerate(_features(data, source)):
        what = f"{source}, feature {index + 1}"  # counted from 1, as box files count rows
        geometry_dict = feature.get("geometry") if isinstance(feature, dict) else None
        if not isinstance(geometry_dict, dict) or geometry_dict.get("type") not in ("Polygon", "MultiPolygon"):
            kind = geometry_dict.get("type") if isinstance(geometry_dict, dict) else "none"
            raise InputError(f"{what}: geometry {kind} is not a Polygon or MultiPolygon (only areas can be objects)")
        try:
            geometry = shapely.geometry.shape(geometry_dict)
        except (ValueError, TypeError, AttributeError) as err:
            raise InputError(f"{what}: invalid {geometry_dict['type']} ({err})") from err
        if not geometry.is_valid:
            geometry = geometry.buffer(0)  # self-crossing rings drawn by hand: the usual repair
        mask, offset = rasterize(geometry, shape_yx)
        if not mask.any():
            continue  # smaller than a pixel, or outside the image
        properties = feature.get("properties") or {}
        classification = properties.get("classification") or {}
        class_name = classification.get("name") if isinstance(classification, dict) else None
        if class_name:
            color = classification.get("color")
            classes.setdefault(class_name, tuple(color) if isinstance(color, list) and len(color) == 3 else None)
        object_id = properties.get("object_id")
        model = properties.get("model")
        objects.append(ImportedObject(
            mask=mask, offset_yx=offset, class_name=class_name or None,
            object_id=object_id if isinstance(object_id, int) else None,
            score=properties.get("score") if isinstance(properties.get("score"), (int, float)) else None,
            model={"name": model} if isinstance(model, str) else {},
            edited=bool(properties.get("edited", True)),
        ))
    return objects, classes
