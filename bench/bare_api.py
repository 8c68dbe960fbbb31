"""The reference of `make bench-api`: a bare FastAPI + sync SQLAlchemy + PostgreSQL one-row read by primary key.

Written as a tutorial would: a module-level engine, a sync route, one ORM `session.get`. It reads the same
`jobs` row the quantserve poll reads, without auth, artifacts or anything else. Run by bench/api.py with
`uvicorn bench.bare_api:app --workers N`, the same number of processes as quantserve's API.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime

from fastapi import FastAPI, HTTPException
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

engine = create_engine(os.environ["BARE_DATABASE_URL"], pool_size=10, max_overflow=10)
app = FastAPI()


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True)
    status: Mapped[str]
    stage: Mapped[str | None]
    progress: Mapped[float]
    created_at: Mapped[datetime]


@app.get("/rows/{row_id}")
def read_row(row_id: uuid.UUID) -> dict:
    with Session(engine) as session:
        row = session.get(JobRow, row_id)
        if row is None:
            raise HTTPException(404)
        return {"id": row.id, "status": row.status, "stage": row.stage, "progress": row.progress,
                "created_at": row.created_at}
