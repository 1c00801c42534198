-- Runs once, when the postgres volume is created (docker-entrypoint-initdb.d).
-- Local/dev credentials; set real ones for anything shared.
CREATE ROLE flowgate LOGIN PASSWORD 'flowgate';
CREATE DATABASE flowgate OWNER flowgate;
CREATE ROLE camunda LOGIN PASSWORD 'camunda';
CREATE DATABASE camunda OWNER camunda;
