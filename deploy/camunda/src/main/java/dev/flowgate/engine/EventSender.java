package dev.flowgate.engine;

import java.net.URI;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.ArrayBlockingQueue;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.TimeUnit;
import java.util.logging.Level;
import java.util.logging.Logger;
import redis.clients.jedis.HostAndPort;
import redis.clients.jedis.JedisCluster;
import redis.clients.jedis.JedisPooled;
import redis.clients.jedis.UnifiedJedis;
import redis.clients.jedis.params.SetParams;
import redis.clients.jedis.params.XAddParams;

/**
 * Sends run events to a Redis stream from a thread of its own, so the engine's transactions
 * never wait for Redis: {@link #send} only queues.
 *
 * <p>The stream is bounded (approximately {@code maxLength} entries); readers keep their own
 * position. Beside it, while this engine runs, {@code <stream>:alive} holds this engine's boot
 * id for a few seconds at a time: a reader that sees it change (a restart, whose last events
 * may never have been sent) or disappear reads the history instead. An event that could not
 * even be queued (a Redis outage longer than the queue) is counted, and {@code <stream>:lost}
 * then holds the time of the first such event, so readers know what to read again.
 */
final class EventSender implements AutoCloseable {
  private static final Logger LOG = Logger.getLogger(EventSender.class.getName());
  private static final long ALIVE_EVERY_MS = 2_000;
  private static final long ALIVE_FOR_MS = 10_000;

  private final UnifiedJedis redis;
  private final String stream;
  private final long maxLength;
  private final BlockingQueue<String> queue;
  private final String bootId = UUID.randomUUID().toString();
  private final Thread thread;
  private volatile boolean running = true;
  private volatile long firstLostAt = 0;

  EventSender(String url, boolean cluster, String stream, long maxLength, int queueSize) {
    URI uri = URI.create(url);
    this.redis =
        cluster
            ? new JedisCluster(new HostAndPort(uri.getHost(), uri.getPort()))
            : new JedisPooled(uri);
    this.stream = stream;
    this.maxLength = maxLength;
    this.queue = new ArrayBlockingQueue<>(queueSize);
    this.thread = new Thread(this::run, "flowgate-run-events");
    this.thread.setDaemon(true);
    this.thread.start();
  }

  /** Queue one event for the stream (never blocks the engine's thread). */
  void send(String event) {
    if (!queue.offer(event) && firstLostAt == 0) {
      firstLostAt = System.currentTimeMillis();
      LOG.warning("run events queue full: events are dropped until Redis takes them again");
    }
  }

  private void run() {
    long aliveAt = 0;
    List<String> batch = new ArrayList<>();
    while (running) {
      try {
        String first = queue.poll(ALIVE_EVERY_MS, TimeUnit.MILLISECONDS);
        if (first != null) {
          batch.add(first);
          queue.drainTo(batch, 499);
        }
        long now = System.currentTimeMillis();
        if (now - aliveAt >= ALIVE_EVERY_MS) {
          redis.set(stream + ":alive", bootId, SetParams.setParams().px(ALIVE_FOR_MS));
          aliveAt = now;
        }
        if (firstLostAt != 0) {
          redis.set(stream + ":lost", Long.toString(firstLostAt));
          firstLostAt = 0;
        }
        for (String event : batch) {
          XAddParams params = XAddParams.xAddParams().maxLen(maxLength).approximateTrimming();
          redis.xadd(stream, params, Map.of("e", event));
        }
        batch.clear();
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
        return;
      } catch (RuntimeException e) {
        // Redis unreachable: keep the batch and try again (the queue holds what comes).
        LOG.log(Level.WARNING, "run events not sent yet: " + e.getMessage());
        sleep();
      }
    }
  }

  private static void sleep() {
    try {
      Thread.sleep(500);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
  }

  @Override
  public void close() {
    running = false;
    thread.interrupt();
    redis.close();
  }
}
