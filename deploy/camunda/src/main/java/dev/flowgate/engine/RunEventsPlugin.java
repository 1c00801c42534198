package dev.flowgate.engine;

import java.util.ArrayList;
import java.util.List;
import org.camunda.bpm.engine.impl.cfg.AbstractProcessEnginePlugin;
import org.camunda.bpm.engine.impl.cfg.ProcessEngineConfigurationImpl;
import org.camunda.bpm.engine.impl.history.handler.HistoryEventHandler;
import org.springframework.beans.factory.annotation.Value;
import org.springframework.boot.autoconfigure.condition.ConditionalOnProperty;
import org.springframework.stereotype.Component;

/**
 * flowgate's engine plugin: the engine pushes the events flowgate follows runs by (see
 * {@link RunEvents}) to a Redis stream, so flowgate ends runs and records their steps as they
 * happen instead of reading the engine's history over and over.
 *
 * <p>On when {@code FLOWGATE_EVENTS_REDIS_URL} is set ({@code FLOWGATE_EVENTS_CLUSTER=true} for
 * a Redis Cluster; {@code FLOWGATE_EVENTS_STREAM}, default {@code flowgate:engine-events},
 * must match flowgate's {@code ENGINE_EVENTS_STREAM}). Without it flowgate reads the history,
 * as it does with any engine.
 *
 * <p>The stream keeps about {@code FLOWGATE_EVENTS_MAX_LENGTH} events (default 100,000, some
 * 50 MB of Redis: minutes of a busy engine's events); a reader that falls further behind
 * reads the history back over the gap once. {@code FLOWGATE_EVENTS_QUEUE_SIZE} events wait
 * in the engine while Redis is away; past that they are counted as lost, which readers
 * notice as a gap too.
 */
@Component
@ConditionalOnProperty(prefix = "flowgate.events", name = "redis-url")
public class RunEventsPlugin extends AbstractProcessEnginePlugin {
  private final EventSender sender;

  public RunEventsPlugin(
      @Value("${flowgate.events.redis-url}") String url,
      @Value("${flowgate.events.cluster:false}") boolean cluster,
      @Value("${flowgate.events.stream:flowgate:engine-events}") String stream,
      @Value("${flowgate.events.max-length:100000}") long maxLength,
      @Value("${flowgate.events.queue-size:100000}") int queueSize) {
    this.sender = new EventSender(url, cluster, stream, maxLength, queueSize);
  }

  @Override
  public void preInit(ProcessEngineConfigurationImpl configuration) {
    List<HistoryEventHandler> handlers = new ArrayList<>();
    if (configuration.getCustomHistoryEventHandlers() != null) {
      handlers.addAll(configuration.getCustomHistoryEventHandlers());
    }
    handlers.add(new RunEvents(sender));
    configuration.setCustomHistoryEventHandlers(handlers);
  }
}
