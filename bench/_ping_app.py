"""A bare Litestar app with one handler: the ceiling the real endpoints are compared with."""

from litestar import Litestar, get


@get("/ping")
async def ping() -> dict[str, str]:
    return {"status": "ok"}


app = Litestar([ping])
