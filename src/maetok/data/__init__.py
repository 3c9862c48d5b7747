"""Datasets and image files: `open_dataset(spec)` for every source, PNG grids, robust single-image loading."""
from .datasets import open_dataset, parse_spec
from .image_datasets import ArrayDataset, ImageDataset, LazyImageDataset, class_count
from .images import (ImageDecodeError, decode_image, float_to_uint8, load_image_file, make_image_grid,
                     resize_center_crop, save_image_grid, to_rgb, uint8_to_float)
from .layout import DatasetError
from .shapes import SHAPE_CLASSES, ShapesDataset

__all__ = ["open_dataset", "parse_spec", "class_count", "ImageDataset", "ArrayDataset",
           "LazyImageDataset", "ShapesDataset", "SHAPE_CLASSES", "DatasetError", "ImageDecodeError", "decode_image",
           "load_image_file", "to_rgb", "resize_center_crop", "uint8_to_float", "float_to_uint8", "make_image_grid",
           "save_image_grid"]
