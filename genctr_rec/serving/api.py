"""The JSON of ``POST /score``: request and response models (pydantic), and the one error shape
``{"detail", "field"}`` every 4xx answer has; declared in the OpenAPI schema."""

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt


class History(BaseModel):
    """The user's behaviour, oldest first."""

    model_config = ConfigDict(extra="forbid")
    item_ids: list[StrictInt]
    category_ids: list[StrictInt] | None = Field(
        default=None, description="one per item; omitted: taken from the item catalogue"
    )
    timestamps: list[StrictInt] | None = Field(default=None, description="optional, oldest first")


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: StrictInt
    category_id: StrictInt | None = Field(
        default=None, description="omitted: taken from the item catalogue"
    )


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: History
    query_category_id: StrictInt
    candidates: list[Candidate] = Field(min_length=1)
    user_id: StrictInt | None = Field(
        default=None, description="omitted or unseen in training: the shared default user row"
    )
    features: dict[str, StrictInt | StrictFloat | list[StrictInt]] | None = Field(
        default=None,
        description="the model's declared impression features by name (GET /metadata lists "
        "them): id -> integer, ids -> list of integers, dense -> number",
    )


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="click probability per candidate, in request order")


class ErrorResponse(BaseModel):
    detail: str
    field: str | None = None
