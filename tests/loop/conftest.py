import pytest


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """One sqlite MLflow store for the loop tests: creating one runs MLflow's migrations (seconds)."""
    return tmp_path_factory.mktemp("mlflow_store") / "mlflow.db"
