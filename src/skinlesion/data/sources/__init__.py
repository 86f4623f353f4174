"""Data sources beyond HAM10000: one reader per source, each returning the same table (``contract``), a
registry that recognises a folder (``registry.detect`` / ``registry.read``), grouping for splits
(``grouping.group_ids``) and the union of several sources (``union.union``). Label maps: ``data.taxonomy``."""
