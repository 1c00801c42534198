// camunda-external-task-client-js (npm 3.1.0), the seed's worker client, completing the
// benchmark topic with a no-op handler.
//   node runner.mjs BASE_URL WORKER_ID MAX_TASKS [INTERVAL_MS]
// Without INTERVAL_MS the client's default poll interval (300 ms) applies, as in the seed
// (fastify-camunda: maxTasks 10, lockDuration 20 s, asyncResponseTimeout 30 s).
import { Client } from "camunda-external-task-client-js";

const [baseUrl, workerId, maxTasks, interval] = process.argv.slice(2);
const options = {
  baseUrl,
  workerId,
  maxTasks: Number(maxTasks),
  lockDuration: 20000,
  asyncResponseTimeout: 30000,
  autoPoll: false,
};
if (interval !== undefined) options.interval = Number(interval);

const client = new Client(options);
client.subscribe("benchmark.noop", async ({ task, taskService }) => {
  await taskService.complete(task);
});
client.on("complete:error", (_task, error) => console.error("complete failed", String(error)));
client.on("poll:error", (error) => console.error("poll failed", String(error)));
client.start();

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => {
    client.stop();
    process.exit(0);
  });
}
