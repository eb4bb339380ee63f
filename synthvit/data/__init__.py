"""The real-data floor: real, high-resolution data in the layouts users have, validated before any training starts.

Formats (detected from the folder, or named with ``fmt``):

- ``canonical``: ``images/<id>.<ext>``, optional ``masks/<id>.png`` (0 = background, k = class k, or 0/255 binary;
  palette masks with other classes, Pascal VOC's ``SegmentationClass``, read 255 = void as background), optional
  ``labels.csv`` (``id,label``); optional ``classes.txt`` names the mask classes (one per line, background first);
- ``imagefolder``: ``<class>/<image>`` (classification only; id ``<class>/<stem>``);
- ``labelme``: JSONs at the root or one folder down (``labelme --output``), each with its image (``imagePath``
  relative to the JSON, either slash) or embedded ``imageData``; see :mod:`synthvit.data.annotations` (label = class name);
- ``coco``: an instance-segmentation JSON (``annotations.json``/``instances*.json`` or any ``*.json`` with
  ``images``, ``annotations``, ``categories``) with polygons, RLE or bboxes, images beside it or under ``images/``;
- ``hf``: a Hugging Face ``datasets`` folder saved with ``save_to_disk`` (columns ``image``, optional ``mask``,
  optional ``label``);
- ``shards``: a ``synthvit generate`` output folder (``_info.json`` + WebDataset shards), e.g. a procedural
  stand-in for real frames; masks and labels come from the shard contract, the encoded samples are held in memory.

Images may be 8- or 16-bit grayscale, RGB, RGBA or palette, with EXIF orientation, up to ``max_pixels``
(a larger frame is refused, named, at exactly that many pixels). Every problem found in a folder is reported at
once: one :class:`DataError` listing the first 20 offending files and the count; frames with transparent pixels
(alpha < 255) are read blended onto black, named in one warning. Readers of part of a folder (generate's readers of
its train split) check what they read the same way before reading it (:func:`checked_split`).

The split, for every format: ``splits.csv`` (``id,split``, split train or test) at the data root, its unlisted ids
an error or ``split_missing``; else :func:`split_ids` draws a seeded split stratified by image label, or by defect
presence in the mask when there are no labels. :func:`near_duplicates` (:mod:`synthvit.data.dedup`) lists the
train/test pairs whose perceptual hashes are within a few bits: copies that leak test content into training.
"""
from synthvit.data.annotations import IMAGE_EXTS, rle_decode
from synthvit.data.core import (
                                GOOD_NAMES,
                                MAX_PIXELS,
                                DataError,
                                Item,
                                RealData,
                                bytes_image,
                                bytes_mask,
                                mask_array,
                                open_image,
                                problems_error,
                                set_pixel_cap,
                                shown_size,
                                to_array,
                                translucent,
                                why,
)
from synthvit.data.dedup import (
                                NearDuplicate,
                                cross_split_pairs,
                                hash_items,
                                near_duplicates,
                                pairs_record,
                                pairs_text,
                                phash,
)
from synthvit.data.formats import (
                                FORMATS,
                                Checked,
                                check_items,
                                checked_split,
                                detect_format,
                                image_files,
                                load_real_data,
                                register_format,
                                validate,
)
from synthvit.data.splits import (
                                SPLIT_MISSING,
                                SPLIT_NAMES,
                                SPLITS_FILE,
                                budget_subset,
                                defect_stratum,
                                defective_order,
                                describe_split,
                                has_defect,
                                read_splits,
                                split_ids,
)

__all__ = ["budget_subset", "defect_stratum", "defective_order", "IMAGE_EXTS", "rle_decode", "GOOD_NAMES", "DataError",
           "Item", "RealData", "bytes_image", "bytes_mask", "mask_array", "open_image", "problems_error",
           "set_pixel_cap", "shown_size", "to_array", "translucent", "why", "FORMATS", "MAX_PIXELS", "Checked",
           "check_items", "checked_split", "detect_format", "image_files", "load_real_data", "register_format",
           "validate", "SPLIT_MISSING", "SPLIT_NAMES", "SPLITS_FILE", "describe_split", "has_defect", "read_splits",
           "split_ids", "NearDuplicate", "cross_split_pairs", "hash_items", "near_duplicates", "pairs_record",
           "pairs_text", "phash"]
