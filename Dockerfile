# One image for the three processes; docker-compose.yml picks the command of each.
#   docker build -t revenue-recovery-copilot .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RRC_DATA_DIR=/app/data

WORKDIR /app
RUN useradd --create-home --uid 10001 rrc

# dependencies first: this layer is rebuilt only when requirements.txt changes
COPY requirements.txt ./
RUN pip install -r requirements.txt

# the application code (listed, so local data, venvs and test artifacts never reach the image)
COPY alembic.ini app.py api.py cli.py config.py scheduler.py ./
COPY .streamlit ./.streamlit
COPY core ./core
COPY connectors ./connectors
COPY db ./db
COPY services ./services
COPY routes ./routes
COPY pages ./pages
COPY ui ./ui

RUN mkdir -p /app/data && chown rrc:rrc /app/data
USER rrc
VOLUME ["/app/data"]
EXPOSE 8000 8501

# the API by default; the app and the scheduler override the command (see docker-compose.yml)
CMD ["python", "-m", "uvicorn", "api:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]
