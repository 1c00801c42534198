package dev.flowgate.engine;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.text.SimpleDateFormat;
import java.util.Date;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.camunda.bpm.engine.impl.cfg.TransactionState;
import org.camunda.bpm.engine.impl.context.Context;
import org.camunda.bpm.engine.impl.history.event.HistoricActivityInstanceEventEntity;
import org.camunda.bpm.engine.impl.history.event.HistoricIncidentEventEntity;
import org.camunda.bpm.engine.impl.history.event.HistoricProcessInstanceEventEntity;
import org.camunda.bpm.engine.impl.history.event.HistoryEvent;
import org.camunda.bpm.engine.impl.history.event.HistoryEventTypes;
import org.camunda.bpm.engine.impl.history.handler.HistoryEventHandler;
import org.camunda.bpm.engine.impl.interceptor.CommandContext;

/**
 * The history events flowgate follows runs by, as the engine writes them: an activity ended,
 * a process instance ended, an incident was created. Each is described with the names the
 * history REST API uses for the same record, and handed to the {@link EventSender} once its
 * transaction has committed (a rolled-back step is never announced). Every other event, and
 * the history itself, is left to the engine's own handler.
 */
final class RunEvents implements HistoryEventHandler {
  private static final ObjectMapper JSON = new ObjectMapper();
  private static final int KEYS_KEPT = 10_000;
  private final EventSender sender;
  /**
   * The business keys of root instances started lately: the events of a start's own
   * transaction name it, so flowgate knows whose they are before it has the instance's id.
   */
  private final Map<String, String> businessKeys =
      java.util.Collections.synchronizedMap(
          new LinkedHashMap<>(256, 0.75f, true) {
            @Override
            protected boolean removeEldestEntry(Map.Entry<String, String> eldest) {
              return size() > KEYS_KEPT;
            }
          });

  RunEvents(EventSender sender) {
    this.sender = sender;
  }

  @Override
  public void handleEvent(HistoryEvent event) {
    if (event instanceof HistoricProcessInstanceEventEntity instance
        && event.isEventOfType(HistoryEventTypes.PROCESS_INSTANCE_START)
        && instance.getBusinessKey() != null
        && instance.getProcessInstanceId().equals(instance.getRootProcessInstanceId())) {
      businessKeys.put(instance.getProcessInstanceId(), instance.getBusinessKey());
      return;
    }
    Map<String, Object> described = describe(event);
    if (described == null) {
      return;
    }
    described.putIfAbsent("businessKey", businessKeys.get(event.getRootProcessInstanceId()));
    String body;
    try {
      body = JSON.writeValueAsString(described);
    } catch (Exception e) {
      return; // a map of strings, dates as text and booleans always serialises
    }
    CommandContext command = Context.getCommandContext();
    if (command == null) {
      sender.send(body);
      return;
    }
    command
        .getTransactionContext()
        .addTransactionListener(TransactionState.COMMITTED, committed -> sender.send(body));
  }

  @Override
  public void handleEvents(List<HistoryEvent> events) {
    events.forEach(this::handleEvent);
  }

  /** The event as the history REST API names the same record, or null if not followed. */
  private static Map<String, Object> describe(HistoryEvent event) {
    Map<String, Object> out = new LinkedHashMap<>();
    if (event instanceof HistoricActivityInstanceEventEntity activity
        && event.isEventOfType(HistoryEventTypes.ACTIVITY_INSTANCE_END)) {
      out.put("kind", "step");
      out.put("id", activity.getActivityInstanceId());
      out.put("activityId", activity.getActivityId());
      out.put("activityName", activity.getActivityName());
      out.put("activityType", activity.getActivityType());
      out.put("processDefinitionKey", activity.getProcessDefinitionKey());
      out.put("processInstanceId", activity.getProcessInstanceId());
      out.put("rootProcessInstanceId", activity.getRootProcessInstanceId());
      out.put("endTime", time(activity.getEndTime()));
      out.put("canceled", activity.isCanceled());
    } else if (event instanceof HistoricProcessInstanceEventEntity instance
        && event.isEventOfType(HistoryEventTypes.PROCESS_INSTANCE_END)) {
      out.put("kind", "end");
      out.put("id", instance.getProcessInstanceId());
      out.put("businessKey", instance.getBusinessKey());
      out.put("state", instance.getState());
      out.put("endTime", time(instance.getEndTime()));
      out.put("deleteReason", instance.getDeleteReason());
      out.put("rootProcessInstanceId", instance.getRootProcessInstanceId());
    } else if (event instanceof HistoricIncidentEventEntity incident
        && event.isEventOfType(HistoryEventTypes.INCIDENT_CREATE)) {
      out.put("kind", "incident");
      out.put("id", incident.getId());
      out.put("processInstanceId", incident.getProcessInstanceId());
      out.put("rootProcessInstanceId", incident.getRootProcessInstanceId());
      out.put("activityId", incident.getActivityId());
      out.put("incidentType", incident.getIncidentType());
      out.put("incidentMessage", incident.getIncidentMessage());
      out.put("createTime", time(incident.getCreateTime()));
    } else {
      return null;
    }
    return out;
  }

  /** The REST API's date format, which flowgate reads everywhere else. */
  private static String time(Date date) {
    return date == null ? null : new SimpleDateFormat("yyyy-MM-dd'T'HH:mm:ss.SSSZ").format(date);
  }
}
