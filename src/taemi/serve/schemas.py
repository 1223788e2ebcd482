"""The API's response shapes, for ``/openapi.json`` (the handlers build plain dicts; these
pydantic models document them). README, "Serving: taemi serve", describes each field."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    status: int = Field(description="the HTTP status")
    code: str = Field(description="a short machine-readable code, e.g. not_media, queue_full")
    message: str = Field(description="names the file (if any) and the problem")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Modality(BaseModel):
    present: bool = Field(description="the modality was extracted (false: the missing token)")
    reason: str | None = Field(description="why it is missing; null when present")


class Attention(BaseModel):
    times: list[float] = Field(
        description="seconds in the media of each valid step: audio, the start of feature "
        "frame i (i / frame rate); vision, the timestamp of the frame the feature came from"
    )
    weights: list[float] = Field(
        description="head-mean cross-attention weight per valid step; they sum to 1"
    )


class Clip(BaseModel):
    id: str = Field(description="the clip id the server gave the file")
    filename: str = Field(description="the client's file name, for display only")
    intensities: dict[str, float] = Field(description="emotion -> value clipped to [0, 1]")
    raw: dict[str, float] = Field(description="emotion -> the model's unclipped value")
    modalities: dict[str, Modality] = Field(description="audio, vision, text")
    transcript: str
    media_seconds: float
    timings: dict[str, float] = Field(
        description="seconds: upload, queue, extract (+ decode, asr, audio, vision, text, "
        "write of the request's extraction), fusion_wait, fusion, total"
    )
    fusion_batch_size: int = Field(description="clips in the fusion micro-batch it ran in")
    attention: dict[str, Attention | None] = Field(
        description="audio, vision; null when the modality is missing or the model has no "
        "text-anchored cross-attention"
    )


class Failure(BaseModel):
    id: str
    filename: str
    status: int
    code: str
    error: str


class PredictResponse(BaseModel):
    run: str
    emotions: list[str]
    clips: list[Clip]
    failures: list[Failure]
