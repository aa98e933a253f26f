"""Feast definitions of vlmrec: entities, sources, feature views, the click push source, feature services.

Source paths are relative to the workspace (the FeatureStore's repo_path; see vlmrec/workspace.py), so one
set of definitions serves every dataset. Apply and materialize with `vlmrec features --workdir W`.

Feature services are named for what reads them. `student_v1` is THE feature list of the student: training
reads it with get_historical_features (point-in-time) and the Producer with get_online_features, so the two
cannot drift.
"""

from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.types import Array, Float32, Int64, String
from feast.value_type import ValueType

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="A shopper.")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="A product.")

click_sequence_source = FileSource(
    name="click_sequences",
    path="data/click_sequences.parquet",
    timestamp_field="event_timestamp",
    description="A user's last N item ids: a row per user, or per click (vlmrec ingest --sequences).",
)
# A click seen by the Producer (POST /v1/events) is pushed here: it updates the online sequence at once.
click_push = PushSource(name="click_push", batch_source=click_sequence_source)

item_embedding_source = FileSource(
    name="item_embeddings",
    path="data/item_embeddings.parquet",
    timestamp_field="event_timestamp",
    description="Teacher vector per item (vlmrec embed).",
)
item_metadata_source = FileSource(
    name="items",
    path="data/items.parquet",
    timestamp_field="event_timestamp",
    description="Catalogue metadata (vlmrec ingest).",
)

# ttl 0 = no limit: a user's last sequence stays valid however long ago they clicked.
user_click_sequence = FeatureView(
    name="user_click_sequence",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="item_ids", dtype=Array(Int64), description="last N item ids, oldest first"),
        # not a model input (student_v1 leaves it out): the write path merges late clicks by time with it
        Field(name="click_times", dtype=Array(Int64), description="their click times, UTC microseconds"),
    ],
    source=click_push,
    online=True,
)
item_embedding = FeatureView(
    name="item_embedding",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="vector", dtype=Array(Float32), description="L2-normalised teacher vector"),
        Field(name="teacher_id", dtype=String, description="the teacher model id that made the vector"),
    ],
    source=item_embedding_source,
    online=True,
)
item_metadata = FeatureView(
    name="item_metadata",
    entities=[item],
    ttl=timedelta(0),
    schema=[
        Field(name="title", dtype=String),
        Field(name="category", dtype=String),
        Field(name="image_uri", dtype=String),
    ],
    source=item_metadata_source,
    online=True,
)

student_v1 = FeatureService(
    name="student_v1",
    features=[user_click_sequence[["item_ids"]]],
    description="The student's input: training (historical) and the Producer (online).",
)
item_vectors_v1 = FeatureService(
    name="item_vectors_v1",
    features=[item_embedding],
    description="Teacher vectors: training reads them, the index builder and upserts embed with them.",
)
item_catalog_v1 = FeatureService(
    name="item_catalog_v1",
    features=[item_metadata],
    description="What a page shows about an item.",
)
