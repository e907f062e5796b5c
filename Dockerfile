# TTS cache proxy: `docker build -t tts-cache-proxy .`
# Add `--build-arg WITH_ESPEAK=true` for real speech from `tts-cache-proxy demo`.
FROM python:3.12-slim

ARG WITH_ESPEAK=false

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only the demo backend uses espeak-ng, so the default image stays without it.
RUN if [ "$WITH_ESPEAK" = "true" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends espeak-ng \
        && rm -rf /var/lib/apt/lists/*; \
    fi

RUN useradd --system --user-group --no-create-home \
        --home-dir /var/lib/tts-cache-proxy --shell /usr/sbin/nologin proxy \
    && mkdir -p /var/lib/tts-cache-proxy/volume \
    && chown -R proxy:proxy /var/lib/tts-cache-proxy

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir .

COPY config/docker.toml /etc/tts-cache-proxy/config.toml

# Declared after the chown so a fresh named volume starts out owned by `proxy`.
VOLUME ["/var/lib/tts-cache-proxy/volume"]

USER proxy
WORKDIR /var/lib/tts-cache-proxy
EXPOSE 8080

# The slim image has no curl; urlopen raises (exit 1) on a refused connection or a non-2xx answer.
# It assumes server.port stays 8080.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/_proxy/health', timeout=4)"]

ENTRYPOINT ["tts-cache-proxy"]
CMD ["serve", "--config", "/etc/tts-cache-proxy/config.toml"]
