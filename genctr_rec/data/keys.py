"""The KeyedJaggedTensor keys the readers produce and the models read, in order: a module of
names only, so that a model knows them without importing the readers (pyarrow and all).

Item-id features share the item table, category-id features the category table
(``genctr_rec.embeddings``); the tables' names are here too, since the batches carry each
table's lookup (``genctr_rec.data.lookups``).
"""

ITEM_TABLE = "item"
CATEGORY_TABLE = "category"

TARGET_ITEM = "item_id"
TARGET_CATEGORY = "category_id"
QUERY_CATEGORY = "query_category_id"
HIST_ITEMS = "hist_item_ids"
HIST_CATEGORIES = "hist_category_ids"
IMPRESSION_KEYS = [TARGET_ITEM, TARGET_CATEGORY, QUERY_CATEGORY, HIST_ITEMS, HIST_CATEGORIES]
SEQ_ITEMS = "seq_item_ids"
SEQ_CATEGORIES = "seq_category_ids"
SEQUENCE_KEYS = [SEQ_ITEMS, SEQ_CATEGORIES]
