-- Databases of the services that share the stack's PostgreSQL.
CREATE DATABASE mlflow OWNER valifi;
CREATE DATABASE prefect OWNER valifi;
