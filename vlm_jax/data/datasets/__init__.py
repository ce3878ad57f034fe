"""tfds builders for the data pipeline (import a builder's module to register it with tfds) and the relation
vocabulary they share.

    builder.py         the record schema every builder writes, the builders' base classes, image reading
    relations.py       spatial relations from boxes (pure Python: the model and the losses use it without tfds)
    spatial_shapes.py  procedural shapes with captions, boxes and spatial relations (no download)
    coco_captions.py   COCO captions, Karpathy splits, from files in `manual_dir`
    refcoco.py         RefCOCO-style referring expressions, from JSON files in `manual_dir`
    coco_detection.py  COCO detection annotations (objects, boxes, categories), from files in `manual_dir`

This package imports nothing heavy itself: tensorflow_datasets loads with the builders.
"""
