# The app server of the two-region example: examples/two-pods/app.py, a FastAPI app on
# relaycore's server SDK. Its endpoints come from the environment, as the Azure SDK reads them
# (Azure__SignalR__Endpoints__<name>[__secondary]); see README.md next to this file.
#   docker build -f deploy/two-region/app.Dockerfile -t relaycore/two-pods-app:dev .
FROM node:20-slim AS js
WORKDIR /js
COPY examples/two-pods/package.json examples/two-pods/package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund

FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY src ./src
# No compiler here: the SDK runs on the pure-Python twin of the fast path, which is plenty for
# an app server (the relay image builds the extension).
RUN pip install --no-cache-dir . "fastapi>=0.110" "uvicorn>=0.29" && rm -rf /src
WORKDIR /app
COPY examples/two-pods/app.py examples/two-pods/index.html ./
COPY --from=js /js/node_modules/@microsoft/signalr/dist/browser/signalr.js ./signalr.js
RUN useradd --system app
USER app
ENV TWO_PODS_SIGNALR_JS=/app/signalr.js PYTHONUNBUFFERED=1
EXPOSE 8000
# POD_NAME names the app server in what it sends (the page shows it).
CMD ["python", "app.py", "--host", "0.0.0.0", "--port", "8000"]
