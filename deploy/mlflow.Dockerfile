# The MLflow tracking server of deploy/docker-compose.yml: MLflow (the project's pin) with the PostgreSQL
# driver (psycopg2) for the backend store and boto3 for the S3 artifact store. Built by compose; by hand:
#   docker build -f deploy/mlflow.Dockerfile -t tmrl-mlflow deploy
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

ARG MLFLOW_VERSION=3.17.2
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
    && python -c "import mlflow, psycopg2, boto3"

EXPOSE 5000
# the server's command line is in docker-compose.yml
CMD ["mlflow", "server", "--help"]
